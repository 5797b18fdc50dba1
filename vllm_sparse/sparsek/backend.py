# SPDX-License-Identifier: Apache-2.0
"""`--attention-backend sparsek`: SparseK attention with compacted, constant KV memory.

Each forward, per layer: write K/V; prefill rows attend by the rule of
`vllm_sparse.sparsek.scorer` (window + top-k by score with SPARSEK's value weights, the
transformers function of training, `hf_attention.attend`, on the row's context); decode
rows let the policy (`vllm_sparse.sparsek.policy`) compact or update the request's k slots
per KV head, then attend the slots (weights p) and the window; every step reports the pages
between the slots and the window to the eviction channel, so vLLM frees them and a
request holds about (k + W) / block_size + 2 pages however long it runs. Decode reads
only the slots and the window, never a freed page.

The scorer file is loaded and checked against the model at start-up (layers, KV heads,
head size); the window W is `sparsek.window` if set, else the file's; k = budget - W.
Mechanism: with the Numba mechanism (a CPU with a float32 cache) prefill's rule (top-k and
SPARSEK per query) is one Numba sweep per KV head (`kernels/cpu_sparsek_rule.py`), each decode
step's bookkeeping one Numba call (`kernels/cpu_sparsek_admit.py`), and decode reads the slots
and the window in place (`kernels/cpu_sparse_decode.py` with value-weighted sinks); otherwise
pure torch (gathers and einsum), with SPARSEK's Triton kernel for prefill's rule and the Triton
K/V write on CUDA.
"""

import functools
import logging
from pathlib import Path
from typing import ClassVar

import torch

from vllm_sparse import reference
from vllm_sparse.backend import SparseMetadata
from vllm_sparse.config import SparseConfig
from vllm_sparse.eviction.impl import EvictingBackend, EvictingImpl
from vllm_sparse.sparsek import hf_attention
from vllm_sparse.sparsek.policy import SparseKPolicy
from vllm_sparse.sparsek.scorer import SparseKScorer

logger = logging.getLogger("vllm.vllm_sparse")

PREFILL_QUERY_BLOCK = 256
"""Prefill queries per block (bounds the [Hkv, Q, context] masks)."""


@functools.cache
def _load(path: str, mtime: float) -> SparseKScorer:
    return SparseKScorer.load(path)


def load_scorer(config: SparseConfig) -> tuple[SparseKScorer, Path, int, int]:
    """The configured scorer (cached per file), k and the window W: `sparsek.window` if set,
    else the file's (the score does not depend on W; the file's is the one it was fitted
    or trained with). k = budget - W."""
    path = config.sparsek.scorer_path()
    if not path.is_file():
        raise FileNotFoundError(f"vllm_sparse: sparsek scorer file {path} does not exist")
    scorer = _load(str(path), path.stat().st_mtime)
    window = config.sparsek.window_tokens(config.budget, scorer.window)
    source = "the scorer's" if config.sparsek.window is None else "sparsek.window's"
    k = config.budget - window
    if k < 1:
        raise ValueError(f"vllm_sparse: sparsek budget={config.budget} leaves no room for the "
                         f"top-k after {source} window of {window} tokens; allowed: "
                         f"budget >= {window + 1} (k = budget - window)")
    if window != scorer.window and not _window_logged:
        _window_logged.add(True)
        logger.info("vllm_sparse: sparsek window %d from the config (the scorer %s was fitted "
                    "with %d), k = %d", window, path.name, scorer.window, k)
    return scorer, path, k, window


_window_logged: set = set()


class SparseKImpl(EvictingImpl):
    """SparseK attention for one layer (shapes: `EvictingImpl`)."""

    method: ClassVar[str | None] = "sparsek"
    weights_name = "sparsek scorer"

    def _load_weights(self):
        scorer, path, self.k, self.window = load_scorer(self.config)
        return scorer, path

    def _bind_policy(self, index: int, device: torch.device) -> None:
        weight, bias, slope = (t[self.heads].to(device) for t in self.weights.layer(index))
        self.sparsek = SparseKPolicy(weight, bias, slope, self.k, self.window,
                                     kernels="numba" if self.mechanism.name == "numba" else "torch")
        # prefill's rule: the Numba sweep on a CPU, SPARSEK's Triton kernel on CUDA
        self._sparsek_kernels = {"torch": "torch", "numba": "numba"}.get(self.mechanism.name,
                                                                          "auto")

    def _attend(self, md: SparseMetadata, query, kv_cache, out) -> torch.Tensor:
        if md.request_keys is None:
            raise RuntimeError("vllm_sparse: sparsek keeps per-request state and got no request "
                               "identity from the model runner (needs vLLM's V1 model runner)")
        self.sparsek.forget(md.live_requests)
        for row in md.prefill_rows:
            self._prefill_row(row, query, kv_cache, md, out)
        if md.decode_rows.numel():
            self._decode(query, kv_cache, md, out)
        num_pages, block_size = md.block_table.shape[1], kv_cache.shape[2]
        return torch.stack([
            self.sparsek.evictable_pages(md.request_key(row), block_size, num_pages,
                                         kv_cache.device)
            for row in range(len(md.seq_lens_cpu))])

    def _prefill_row(self, row: int, query, kv_cache, md: SparseMetadata, out) -> None:
        """The row's queries attend by the rule over the tokens at their own positions."""
        start, end = md.query_start_loc[row], md.query_start_loc[row + 1]
        seq_len = md.seq_lens_cpu[row]
        self.sparsek.begin_prefill(md.request_key(row), seq_len - (end - start), seq_len)
        positions = torch.arange(seq_len, device=query.device).expand(1, self.num_kv_heads, -1)
        key, value = reference.gather_kv(kv_cache, md.block_table[row][None], positions)
        u = self.sparsek.scores(key[0], value[0], 0)
        result, _ = hf_attention.attend(query[start:end].transpose(0, 1), key[0], value[0], u,
                                        self.k, self.sparsek.window, self.scale,
                                        PREFILL_QUERY_BLOCK, kernels=self._sparsek_kernels,
                                        with_stats=False)
        out[start:end] = result.transpose(0, 1)

    def _decode(self, query, kv_cache, md: SparseMetadata, out) -> None:
        """Decode rows attend their slots (weights p) and their window (weight 1): the
        slots are the first m positions, so with the Numba mechanism this is the CPU sparse
        decode with m sinks, value-weighted, and the window, read in place; otherwise
        gathers and `reference.attend`."""
        rows = md.decode_rows.tolist()
        slots = [self.sparsek.decode(md.request_key(r), md.seq_lens_cpu[r] - 1, kv_cache,
                                     md.block_table[r]) for r in rows]
        seq_lens = md.seq_lens[md.decode_rows]
        if self.mechanism.name == "numba":
            from vllm_sparse.kernels.cpu_sparse_decode import cpu_sparse_paged_decode

            width = max(m for m, _ in slots)
            weights = torch.ones(len(rows), self.num_kv_heads, width)
            for i, (m, slot_weights) in enumerate(slots):
                weights[i, :, :m] = slot_weights
            result, attended = cpu_sparse_paged_decode(
                query[md.decode_token_index], kv_cache, md.block_table[md.decode_rows], seq_lens,
                torch.zeros(len(rows), self.num_kv_heads, 0, dtype=torch.long), "token",
                torch.tensor([m for m, _ in slots]), self.sparsek.window, self.scale,
                sink_weights=weights)
            out[md.decode_token_index] = result
            self._count(attended, seq_lens, 0)
            return
        positions, value_weights, valid = self._read_set(slots, seq_lens.tolist(), query.device)
        key, value = reference.gather_kv(kv_cache, md.block_table[md.decode_rows], positions)
        out[md.decode_token_index] = reference.attend(query[md.decode_token_index], key, value,
                                                      valid, self.scale, value_weights)[0]
        self._count(valid.sum(-1), seq_lens, 0)

    def _read_set(self, slots, seq_lens, device):
        """(positions, value weights, valid) [rows, Hkv, width] of each decode row: its m
        slots (weights p) then its window (weight 1)."""
        window = self.sparsek.window
        lists, weights = [], []
        for (m, slot_weights), seq_len in zip(slots, seq_lens):
            recent = torch.arange(max(m, seq_len - window), seq_len, device=device)
            lists.append(torch.cat([torch.arange(m, device=device), recent]))
            weights.append(torch.cat([slot_weights,
                                      slot_weights.new_ones(self.num_kv_heads, len(recent))], 1))
        shape = (len(lists), self.num_kv_heads, max(len(t) for t in lists))
        positions = torch.zeros(shape, dtype=torch.long, device=device)
        value_weights = torch.zeros(shape, device=device)
        valid = torch.zeros(shape, dtype=torch.bool, device=device)
        for i, (t, w) in enumerate(zip(lists, weights)):
            positions[i, :, : len(t)], value_weights[i, :, : len(t)] = t, w
            valid[i, :, : len(t)] = True
        return positions, value_weights, valid


class SparseKBackend(EvictingBackend):
    """`--attention-backend sparsek`: SparseK with an evicting KV-cache spec (pages outside
    every request's k slots and window return to vLLM's block pool)."""

    method: ClassVar[str | None] = "sparsek"

    @staticmethod
    def get_name() -> str:
        return "SPARSEK"

    @staticmethod
    def get_impl_cls():
        return SparseKImpl
