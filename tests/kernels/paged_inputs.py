# SPDX-License-Identifier: Apache-2.0
"""Shared set-up and input builders for the kernel tests.

Import this module before any `kernels.*` module: Triton reads TRITON_INTERPRET when a kernel
module is imported, so it is set here (without a GPU) before the repository root goes on sys.path.
"""

import importlib.util
import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton reads this when the kernel module is imported: set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Smallest common model head size; keeps the CPU interpreter fast.
HEAD_DIM = 64
# Most common vLLM cache block size.
BLOCK_SIZE = 16


def cache_shape(layout, num_blocks, hkv, block_size, head_dim):
    """Physical allocation behind a logical [num_blocks, Hkv, block_size, 2D] cache view (see cache_view).

    "padded": extra head / channels around the logical view; "permuted": physical [blocks, bs, Hkv, 2D];
    "every_other": every second channel of a [blocks, Hkv, bs, 4D] buffer (non-unit channel stride)."""
    return {"padded": (num_blocks, hkv + 1, block_size, 2 * head_dim + 8),
            "permuted": (num_blocks, block_size, hkv, 2 * head_dim),
            "every_other": (num_blocks, hkv, block_size, 4 * head_dim)}[layout]


def cache_view(base, layout, head_dim):
    """The logical [num_blocks, Hkv, block_size, 2D] cache view of a physical allocation."""
    if layout == "padded":
        return base[:, 1:, :, 4:4 + 2 * head_dim]
    return base.permute(0, 2, 1, 3) if layout == "permuted" else base[..., ::2]


def strided_cache(num_blocks, hkv, dtype, layout, gen, *, head_dim=HEAD_DIM, block_size=BLOCK_SIZE,
                  view_on_device):
    """(physical allocation, *strided* kv_cache view on DEVICE) filled from `gen`.

    view_on_device=True moves the allocation to DEVICE and takes the view there (it stays strided);
    False takes the view on the CPU and moves the view, which .to(DEVICE) may make contiguous on a
    GPU (the returned allocation then stays on the CPU)."""
    base = torch.randn(cache_shape(layout, num_blocks, hkv, block_size, head_dim), generator=gen).to(dtype)
    if view_on_device:
        base = base.to(DEVICE)
    kv_cache = cache_view(base, layout, head_dim)
    assert not kv_cache.is_contiguous()
    return base, kv_cache.to(DEVICE)


def num_pages(lens, block_size):
    """Cache blocks of the longest of `lens` tokens, plus one spare."""
    return max(-(-t // block_size) for t in lens) + 1


def shuffled_block_table(n, max_pages, num_blocks, gen):
    """[n, max_pages] int64 CPU block table: distinct physical blocks in random order."""
    return torch.randperm(num_blocks, generator=gen)[: n * max_pages].view(n, max_pages)


def decode_inputs(seq_lens, hq, hkv, dtype, *, block_size=BLOCK_SIZE, head_dim=HEAD_DIM, layout="padded",
                  seed=0, q_scale=None):
    """Random query [N, Hq, D], a *strided* kv_cache view, a shuffled block table and seq_lens (one decode
    token per sequence). q_scale=None leaves the query unscaled (no multiply at all)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(seq_lens)
    max_pages = num_pages(seq_lens, block_size)
    num_blocks = n * max_pages + 7  # more physical blocks than needed
    _, kv_cache = strided_cache(num_blocks, hkv, dtype, layout, gen, head_dim=head_dim, block_size=block_size,
                                view_on_device=False)
    block_table = shuffled_block_table(n, max_pages, num_blocks, gen)
    query = torch.randn(n, hq, head_dim, generator=gen)
    if q_scale is not None:
        query = q_scale * query
    query = query.to(dtype)
    return (query.to(DEVICE), kv_cache, block_table.to(torch.int32).to(DEVICE),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE))


def gather_kv(kv_cache, block_table, i, t_len):
    """Contiguous [T, Hkv, 2D] K/V of sequence i."""
    pos = torch.arange(t_len, device=kv_cache.device)
    return kv_cache[block_table[i, pos // kv_cache.shape[2]].long(), :, pos % kv_cache.shape[2]]


def random_selection(seq_lens, hkv, mode, num_sel, *, block_size=BLOCK_SIZE, seed=1):
    """[N, Hkv, num_sel] int32 unique entries (some beyond the context), -1 padding mixed in."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t_len in seq_lens:
        limit = -(-t_len // block_size) + 2 if mode == "page" else t_len + 8
        for _ in range(hkv):
            k = min(num_sel - 1, limit)  # always leave at least one -1
            row = torch.cat([torch.randperm(limit, generator=gen)[:k], torch.full((num_sel - k,), -1)])
            rows.append(row[torch.randperm(num_sel, generator=gen)])
    return torch.stack(rows).view(len(seq_lens), hkv, num_sel).to(torch.int32).to(DEVICE)


def dense_union_attention(query, kv_cache, block_table, seq_lens, selected, mode, sinks, window, scale):
    """Independent check: python-set union mask + dense masked softmax in float64."""
    n, hq, d = query.shape
    hkv, bs = kv_cache.shape[1], kv_cache.shape[2]
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    counts = torch.zeros(n, hkv, dtype=torch.int64)
    for i in range(n):
        t_len = int(seq_lens[i])
        kv = gather_kv(kv_cache, block_table, i, t_len).double().cpu()
        for g in range(hkv):
            keep = set(range(min(sinks, t_len))) | set(range(max(t_len - window, 0), t_len))
            for e in selected[i, g].tolist():
                if e >= 0:
                    keep |= set(range(e * bs, (e + 1) * bs)) if mode == "page" else {e}
            keep = {t for t in keep if t < t_len}
            counts[i, g] = len(keep)
            mask = torch.zeros(t_len, dtype=torch.bool)
            mask[sorted(keep)] = True
            heads = slice(g * (hq // hkv), (g + 1) * (hq // hkv))
            s = query[i, heads].double().cpu() @ kv[:, g, :d].T * scale
            s = s.masked_fill(~mask, float("-inf"))
            out[i, heads] = torch.softmax(s, dim=-1) @ kv[:, g, d:]
    return out, counts


def load_package_reference():
    """vllm_sparse/reference.py loaded by path: it needs only torch, and skipping the package
    __init__ avoids importing vLLM (seconds)."""
    spec = importlib.util.spec_from_file_location("_vs_reference", os.path.join(REPO_ROOT, "vllm_sparse",
                                                                                "reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
