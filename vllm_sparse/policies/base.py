# SPDX-License-Identifier: Apache-2.0
"""What every policy gets and returns. Policies decide what to attend to; the backend
and the kernels (or `vllm_sparse.reference`) do the attending."""

from dataclasses import dataclass

import torch


@dataclass
class DecodeQueries:
    """Queries that attend like decode steps, one row each.

    query: [N, Hq, D]; seq_lens: [N] context length including the query's own token;
    block_table: [N, max_pages] physical block of each logical page; budgets: [N] tokens.
    """

    query: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    budgets: torch.Tensor


@dataclass
class Selection:
    """Page-mode selection: pages [N, Hkv, K] logical page ids (-1 padded), attended
    together with each row's first `num_sink_tokens` [N] and last `local_window` [N]
    tokens (see `vllm_sparse.reference` for the exact set)."""

    pages: torch.Tensor
    num_sink_tokens: torch.Tensor
    local_window: torch.Tensor


class SparsePolicy:
    """Interface: `observe_write` after K/V are cached, `select` for decode queries."""

    num_sink_tokens: int = 0
    local_window: int = 0

    def observe_write(self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Update per-page state after this step's K/V were written at `slot_mapping`."""

    def select(self, queries: DecodeQueries, kv_cache: torch.Tensor) -> Selection:
        raise NotImplementedError
