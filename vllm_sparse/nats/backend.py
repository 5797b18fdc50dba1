# SPDX-License-Identifier: Apache-2.0
"""`--attention-backend nats`: NAtS attention with KV eviction (vLLM glue and mechanism).

Each forward, per layer: write K/V, let the policy (`vllm_sparse.nats.policy`) type the
chunks the step completed, attend each query to the tokens its KV head still sees
(prefill: the live tokens under the `gates.visible` mask; decode: exactly the live tokens,
token by token), and report to the eviction channel the pages no later query of any of
this layer's KV heads attends. Only live tokens are gathered, so a freed page (which may
already hold another request's data) is never read, not even under a mask.

The gates file is loaded and checked against the model at start-up (model construction:
layers, KV heads, head size; the metadata builder: KV block size).
"""

import functools
import logging
from pathlib import Path
from typing import ClassVar

import torch

from vllm_sparse import reference
from vllm_sparse.backend import SparseMetadata
from vllm_sparse.config import NatsConfig, resolve_from_vllm
from vllm_sparse.eviction.impl import EvictingBackend, EvictingImpl, EvictingMetadataBuilder
from vllm_sparse.nats.gates import NatsGates
from vllm_sparse.nats.policy import NatsPolicy, check_block_size

logger = logging.getLogger("vllm.vllm_sparse")
PREFILL_CHUNK = 256
"""Prefill queries attended per chunk (bounds the [Q, Hkv, L] mask)."""


@functools.cache
def _load(path: str, mtime: float) -> NatsGates:
    return NatsGates.load(path)


def load_gates(config: NatsConfig) -> tuple[NatsGates, Path]:
    """The configured gates (cached per file), with `chunk_size`/`window` checked."""
    path = config.gates_path()
    if not path.is_file():
        raise FileNotFoundError(f"vllm_sparse: nats gates file {path} does not exist")
    gates = _load(str(path), path.stat().st_mtime)
    for name in ("chunk_size", "window"):
        wanted, have = getattr(config, name), getattr(gates, name)
        if wanted is not None and wanted != have:
            raise ValueError(f"vllm_sparse: nats.{name}={wanted} contradicts the gates file "
                             f"{path} ({name}={have}); the file is the source of truth: "
                             f"remove nats.{name} or set it to {have}")
    return gates, path


def _gates_for(vllm_config) -> tuple[NatsGates, Path]:
    return load_gates(resolve_from_vllm(vllm_config, "nats").nats)


class NatsMetadataBuilder(EvictingMetadataBuilder):
    """The evicting metadata, plus the check that KV blocks and the gates' chunks nest."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        gates, _ = _gates_for(vllm_config)
        check_block_size(gates.chunk_size, kv_cache_spec.block_size)


class NatsImpl(EvictingImpl):
    """NAtS attention for one layer (shapes: `EvictingImpl`)."""

    method: ClassVar[str | None] = "nats"
    weights_name = "nats gates"

    def _load_weights(self):
        return load_gates(self.config.nats)

    def _bind_policy(self, index: int, device: torch.device) -> None:
        weight, bias = self.weights.layer(index)
        self.nats = NatsPolicy(weight[self.heads].to(device), bias[self.heads].to(device),
                               self.weights.chunk_size, self.weights.window)

    def _attend(self, md: SparseMetadata, query, kv_cache, out) -> torch.Tensor:
        self.nats.forget(md.live_requests)
        types = [self._update_types(row, md, kv_cache) for row in range(len(md.seq_lens_cpu))]
        for row in md.prefill_rows:
            self._prefill_row(row, types[row], query, kv_cache, md, out)
        if md.decode_rows.numel():
            self._decode(types, query, kv_cache, md, out)
        return self._evictable(types, md, kv_cache)

    # ------------------------------------------------------------ policy
    def _update_types(self, row: int, md: SparseMetadata, kv_cache) -> torch.Tensor:
        """Types [Hkv, n] of the row's complete chunks after this step (state updated)."""
        chunk = self.nats.chunk_size
        seq_len = md.seq_lens_cpu[row]
        first = seq_len - (md.query_start_loc[row + 1] - md.query_start_loc[row])
        key = md.request_key(row)
        before = self.nats.known(key, first)
        if before is None:
            _log_once("vllm_sparse: nats: a step without request identity recomputes its "
                      "chunk types from the cache and frees nothing (logged once)")
            before = self.nats.chunk_types(*self.nats.no_chunks(), first_chunk=0)
        start, end = before.shape[1] * chunk, seq_len // chunk * chunk
        if start == end:                                  # no chunk completed
            return self.nats.extend(key, before, *self.nats.no_chunks())
        return self.nats.extend(key, before, *self._read(kv_cache, md, row, start, end))

    def _read(self, kv_cache, md: SparseMetadata, row: int, start: int, end: int):
        """Keys and values [Hkv, end - start, D] of positions [start, end) of one row
        (tokens of chunks being typed: never evicted)."""
        positions = torch.arange(start, end, device=kv_cache.device)
        k, v = reference.gather_kv(kv_cache, md.block_table[row][None],
                                   positions.expand(1, self.num_kv_heads, -1))
        return k[0], v[0]

    def _evictable(self, types, md: SparseMetadata, kv_cache) -> torch.Tensor:
        num_pages = md.block_table.shape[1]
        evictable = torch.zeros(len(types), num_pages, dtype=torch.bool, device=kv_cache.device)
        if md.request_keys is not None:
            for row, row_types in enumerate(types):
                evictable[row] = self.nats.evictable_pages(row_types, md.seq_lens_cpu[row],
                                                           kv_cache.shape[2], num_pages)
        return evictable

    # ------------------------------------------------------------ mechanism
    def _prefill_row(self, row: int, types, query, kv_cache, md: SparseMetadata, out) -> None:
        """The row's queries attend the live tokens they see (`gates.visible`)."""
        start, end = md.query_start_loc[row], md.query_start_loc[row + 1]
        seq_len = md.seq_lens_cpu[row]
        first = seq_len - (end - start)
        positions = self.nats.live_tokens(types, first, seq_len)          # [Hkv, L]
        key, value = reference.gather_kv(kv_cache, md.block_table[row][None],
                                         positions.where(positions >= 0, seq_len - 1)[None])
        for lo in range(start, end, PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, end)
            query_pos = torch.arange(lo - start + first, hi - start + first,
                                     device=query.device)
            valid = self.nats.visible(types, query_pos, positions, seq_len)
            out[lo:hi] = reference.masked_attention(query[lo:hi], key, value, valid,
                                                    self.scale)

    def _decode(self, types, query, kv_cache, md: SparseMetadata, out) -> None:
        """Decode rows attend exactly their live tokens, per KV head (token mode)."""
        rows = md.decode_rows.tolist()
        lists = [self.nats.live_tokens(types[r], md.seq_lens_cpu[r] - 1, md.seq_lens_cpu[r])
                 for r in rows]
        width = max(t.shape[1] for t in lists)
        tokens = torch.full((len(rows), self.num_kv_heads, width), -1, dtype=torch.long,
                            device=query.device)
        for i, t in enumerate(lists):
            tokens[i, :, : t.shape[1]] = t
        # -1 entries are read at position 0 and masked: chunk 0 is GLOBAL for every head,
        # so page 0 is never evicted.
        seq_lens = md.seq_lens[md.decode_rows].long()
        result, attended = self.mechanism.decode_tokens(
            query[md.decode_token_index], kv_cache, md.block_table[md.decode_rows], seq_lens,
            tokens, self.scale)
        out[md.decode_token_index] = result
        self._count(attended, seq_lens, 0)


_logged: set = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


class NatsBackend(EvictingBackend):
    """`--attention-backend nats`: NAtS with an evicting KV-cache spec (pages whose tokens
    every KV head of every layer evicted return to vLLM's block pool)."""

    method: ClassVar[str | None] = "nats"

    @staticmethod
    def get_name() -> str:
        return "NATS"

    @staticmethod
    def get_impl_cls():
        return NatsImpl

    @staticmethod
    def get_builder_cls():
        return NatsMetadataBuilder
