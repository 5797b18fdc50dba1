# SPDX-License-Identifier: Apache-2.0
"""The two implementations of the backend's mechanism: pure torch and Triton kernels.

Both take the same arguments and compute the same thing (the kernels' tests compare
them); the config's `kernels` switch picks one: `auto` is Triton on CUDA and torch
elsewhere, `triton` on a CPU runs the kernels under Triton's interpreter
(`TRITON_INTERPRET=1`, slow: for tests), `torch` is the fallback everywhere.

A decode `Selection` (pages [N, Hkv, K], per-row sinks and window) is attended by
`decode`; dense rows are passed as every page with no sinks or window. `decode` also
returns which tokens it attended (for the backend's counters).
"""

import os

import torch

from vllm_sparse import reference


def resolve_kernels(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """'torch' or 'triton' for a config value of 'auto' | 'torch' | 'triton'."""
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
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
        """(out [N, Hq, D], valid [N, Hkv, L]: the attended tokens of the pages read)."""
        page_ids, valid = reference.selection_pages(pages, seq_lens, sinks, window,
                                                    kv_cache.shape[2])
        key, value = reference.gather_pages(kv_cache, block_table, page_ids)
        return reference.attend(query, key, value, valid, scale)[0], valid

    def decode_tokens(self, query, kv_cache, block_table, seq_lens, tokens, scale):
        """Token-mode decode: attend tokens [N, Hkv, W] (-1 padded); (out, valid [N, Hkv, W])."""
        valid = reference.token_validity(tokens, seq_lens)
        key, value = reference.gather_kv(kv_cache, block_table, tokens.clamp(min=0))
        return reference.attend(query, key, value, valid, scale)[0], valid

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
        """(out [N, Hq, D], valid [N, Hkv, L]); `valid` only feeds the counters."""
        out = self._decode(query, kv_cache, block_table.to(torch.int32), seq_lens.to(torch.int32),
                           pages.to(torch.int32), "page", sinks, window, scale)
        _, valid = reference.selection_pages(pages, seq_lens, sinks, window, kv_cache.shape[2])
        return out, valid

    def decode_tokens(self, query, kv_cache, block_table, seq_lens, tokens, scale):
        out = self._decode(query, kv_cache, block_table.to(torch.int32), seq_lens.to(torch.int32),
                           tokens.to(torch.int32), "token", 0, 0, scale)
        return out, reference.token_validity(tokens, seq_lens)

    def decode_with_scores(self, query, kv_cache, block_table, seq_lens, scale):
        return self._scores(query, kv_cache, block_table.to(torch.int32),
                            seq_lens.to(torch.int32), scale)


def make_mechanism(name: str):
    return TritonMechanism() if name == "triton" else TorchMechanism()
