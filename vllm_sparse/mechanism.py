# SPDX-License-Identifier: Apache-2.0
"""The three implementations of the backend's mechanism: pure torch, Triton kernels on
CUDA, Numba kernels on the CPU.

All take the same arguments and compute the same thing (the kernels' tests compare
them); the config's `kernels` switch picks one: `auto` is Triton on CUDA, Numba on a CPU
with a float32 KV cache and torch otherwise; `triton` on a CPU runs the Triton kernels
under Triton's interpreter (`TRITON_INTERPRET=1`, slow: for tests); `torch` is the
fallback everywhere. The Numba mechanism replaces only the sparse decode (and Radar's
page scores); prefill, K/V writes and Recycled's scored full steps stay in torch.

A decode `Selection` (pages [N, Hkv, K], per-row sinks and window) is attended by
`decode`; dense rows are passed as every page with no sinks or window. `decode` and
`decode_tokens` also return how many tokens each (row, KV head) attended, [N, Hkv]
(for the backend's counters).
"""

import logging
import os

import torch

from vllm_sparse import reference
from vllm_sparse.config import KERNEL_CHOICES

logger = logging.getLogger("vllm.vllm_sparse")


def resolve_kernels(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """'torch', 'triton' or 'numba' for a config value in KERNEL_CHOICES."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"vllm_sparse: kernels={choice!r}; allowed: {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and dtype == torch.float32:
            return "numba"
        if not _torch_logged:
            _torch_logged.add(True)
            logger.info("vllm_sparse: kernels=auto runs the pure-torch mechanism on %s with %s "
                        "(the Numba CPU kernels need float32; logged once)", device.type, dtype)
        return "torch"
    if choice == "numba" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"vllm_sparse: kernels='numba' needs a float32 KV cache on the CPU, got "
                         f"{dtype} on {device.type}; use kernels='auto' or 'torch'")
    if choice == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("vllm_sparse: kernels='triton' on a CPU needs TRITON_INTERPRET=1 "
                             "(Triton has no CPU backend); use kernels='torch' or 'auto'")
        if dtype == torch.bfloat16:
            raise ValueError("vllm_sparse: kernels='triton' under the Triton interpreter needs "
                             "float32 or float16 (bf16 tl.dot is wrong there), got bfloat16")
    return choice


class TorchMechanism:
    """Pure torch (`vllm_sparse.reference`)."""

    name = "torch"

    def write_kv(self, kv_cache, key, value, slot_mapping) -> None:
        reference.write_kv(kv_cache, key, value, slot_mapping)

    def prefill(self, query, kv_cache, block_tables, query_start_loc, seq_lens, scale, out) -> None:
        """Dense causal attention of each prefill row; query/out [T, Hq, D], host lists."""
        for i, seq_len in enumerate(seq_lens):
            start, end = query_start_loc[i], query_start_loc[i + 1]
            out[start:end] = reference.dense_prefill(query[start:end], kv_cache, block_tables[i],
                                                     seq_len, scale)

    def decode(self, query, kv_cache, block_table, seq_lens, pages, sinks, window, scale):
        """(out [N, Hq, D], attended [N, Hkv]: tokens attended per row and KV head)."""
        page_ids, valid = reference.selection_pages(pages, seq_lens, sinks, window,
                                                    kv_cache.shape[2])
        key, value = reference.gather_pages(kv_cache, block_table, page_ids)
        return reference.attend(query, key, value, valid, scale)[0], valid.sum(-1)

    def decode_tokens(self, query, kv_cache, block_table, seq_lens, tokens, scale):
        """Token-mode decode: attend tokens [N, Hkv, W] (-1 padded); (out, attended [N, Hkv])."""
        valid = reference.token_validity(tokens, seq_lens)
        key, value = reference.gather_kv(kv_cache, block_table, tokens.clamp(min=0))
        return reference.attend(query, key, value, valid, scale)[0], valid.sum(-1)

    def decode_with_scores(self, query, kv_cache, block_table, seq_lens, scale):
        """Dense decode plus group-max attention weights: (out, scores [N, Hkv, L])."""
        block_size = kv_cache.shape[2]
        num_pages = -(-int(seq_lens.max()) // block_size)
        pages = torch.arange(num_pages, device=query.device).expand(
            query.shape[0], kv_cache.shape[1], -1)
        key, value = reference.gather_pages(kv_cache, block_table, pages)
        positions = torch.arange(num_pages * block_size, device=query.device)
        valid = (positions < seq_lens.long()[:, None, None]).expand(-1, kv_cache.shape[1], -1)
        out = reference.attend(query, key, value, valid, scale)[0]
        return out, reference.group_max_probs(query, key, valid, scale)


class TritonMechanism:
    """Triton kernels from `kernels/` (installed as `vllm_sparse.kernels`)."""

    name = "triton"

    def __init__(self):
        from vllm_sparse.kernels import kv_write, paged_prefill, score_capture, sparse_decode

        self._scores = score_capture.decode_with_scores
        self._write = kv_write.write_kv
        self._prefill = paged_prefill.paged_prefill
        self._decode = sparse_decode.sparse_paged_decode

    def write_kv(self, kv_cache, key, value, slot_mapping) -> None:
        self._write(kv_cache, key, value, slot_mapping)

    def prefill(self, query, kv_cache, block_tables, query_start_loc, seq_lens, scale, out) -> None:
        device = query.device
        starts = torch.tensor(query_start_loc, dtype=torch.int32, device=device)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self._prefill(query, kv_cache, block_tables.to(torch.int32), starts, lens, scale, out=out)

    def decode(self, query, kv_cache, block_table, seq_lens, pages, sinks, window, scale):
        """(out [N, Hq, D], attended [N, Hkv]); `attended` only feeds the counters."""
        out = self._decode(query, kv_cache, block_table.to(torch.int32), seq_lens.to(torch.int32),
                           pages.to(torch.int32), "page", sinks, window, scale)
        _, valid = reference.selection_pages(pages, seq_lens, sinks, window, kv_cache.shape[2])
        return out, valid.sum(-1)

    def decode_tokens(self, query, kv_cache, block_table, seq_lens, tokens, scale):
        out = self._decode(query, kv_cache, block_table.to(torch.int32), seq_lens.to(torch.int32),
                           tokens.to(torch.int32), "token", 0, 0, scale)
        return out, reference.token_validity(tokens, seq_lens).sum(-1)

    def decode_with_scores(self, query, kv_cache, block_table, seq_lens, scale):
        return self._scores(query, kv_cache, block_table.to(torch.int32),
                            seq_lens.to(torch.int32), scale)


class NumbaMechanism(TorchMechanism):
    """Numba CPU kernels (`kernels/cpu_sparse_decode.py`) for the sparse decode; the rest is
    torch. Float32 only (checked by `resolve_kernels`)."""

    name = "numba"

    def __init__(self):
        from vllm_sparse.kernels import cpu_sparse_decode

        self._decode = cpu_sparse_decode.cpu_sparse_paged_decode

    def decode(self, query, kv_cache, block_table, seq_lens, pages, sinks, window, scale):
        return self._decode(query, kv_cache, block_table, seq_lens, pages, "page", sinks, window,
                            scale)

    def decode_tokens(self, query, kv_cache, block_table, seq_lens, tokens, scale):
        return self._decode(query, kv_cache, block_table, seq_lens, tokens, "token", 0, 0, scale)


_torch_logged: set = set()
_MECHANISMS = {"torch": TorchMechanism, "triton": TritonMechanism, "numba": NumbaMechanism}


def make_mechanism(name: str):
    return _MECHANISMS[name]()
