# SPDX-License-Identifier: Apache-2.0
"""Sparse paged decode attention on the CPU (Numba), without gathering the K/V.

Same semantics and arguments as ``sparse_decode.sparse_paged_decode`` (the Triton
kernel; its module docstring defines the attended set): one query token per
sequence attends the union, each token once, of its sinks, its local window and its
selected pages (``mode="page"``) or tokens (``mode="token"``), read in place from
vLLM's paged KV cache through the block table.

Shapes (N sequences, Hq query heads, Hkv KV heads, D head size):

* ``query``       [N, Hq, D] fp32
* ``kv_cache``    [num_blocks, Hkv, block_size, 2*D] fp32, keys ``[..., :D]``, values
  ``[..., D:]``, any strides
* ``block_table`` [N, max_pages] int, ``seq_lens`` [N] int (the current token included)
* ``selected``    [N, Hkv, S] int, -1 padded, unique per row
* ``num_sink_tokens``, ``local_window``: int or [N] int
* ``sink_weights`` (optional, this kernel only) [N, Hkv, S] fp32: value weights of the first
  S sink tokens, applied after the softmax without renormalising (SparseK reads its k slots,
  positions [0, m), as m weighted sinks)

Why it exists: on a CPU the pure-torch path (``vllm_sparse.reference``) copies the
selected K/V into a new tensor and then reads it twice; with a budget of a quarter of
the context that moves about as many bytes as vLLM's fused ``CPU_ATTN`` reading
everything. Here each (sequence, KV head) walks its attended token ranges once, page by
page (token mode: in chunks of block_size tokens), with an online softmax (fp32) per query
head of its group, four tokens per pass over the head dimension, exponentials in vector
loops (``cpu_exp``), in parallel over (sequence, KV head) on Numba's threads. fp32 only:
Numba has no bfloat16.

Reference: ``sparse_decode.sparse_paged_decode_ref`` (pure torch, float64 softmax).
"""

import math

import numba
import numpy as np
import torch

from .cpu_exp import exp_shifted
from .numba_setup import FASTMATH, match_torch_threads

_MODES = ("page", "token")


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _fold(kv, rows, num, q, m, l, acc, scores, bits, vw, weighted):
    """Fold the cache rows rows[:num] into the online softmax (m, l, acc) of the group's
    queries q [G, D] (scale applied); with `weighted`, token i's value is scaled by vw[i]
    after the softmax (SparseK's p: the sum l is not). kv is the cache as rows [R, 2D] (key,
    value): the loops over the head dimension are unit-stride in a 2-D array, which Numba
    vectorises (flat 1-D indexing it does not). One rescale of acc per chunk, not per token,
    and four tokens per pass over the head dimension: each short inner loop costs its set-up and
    alias checks once per four tokens, and acc is loaded and stored once per four (1.7x
    faster than one token per pass at 7.5K context, batch 8). The exponentials go through
    `exp_shifted` (vectorised; libm's scalar expf was the fold's largest cost); `bits` is
    its int32 scratch, as long as `scores`."""
    group, head_size = q.shape
    four = num - num % 4
    for g in range(group):
        qg = q[g]
        ag = acc[g]
        top = -np.inf
        for i in range(0, four, 4):
            k0, k1, k2, k3 = kv[rows[i]], kv[rows[i + 1]], kv[rows[i + 2]], kv[rows[i + 3]]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for d in range(head_size):
                qd = qg[d]
                s0 += qd * k0[d]
                s1 += qd * k1[d]
                s2 += qd * k2[d]
                s3 += qd * k3[d]
            scores[i], scores[i + 1], scores[i + 2], scores[i + 3] = s0, s1, s2, s3
            top = max(top, max(max(s0, s1), max(s2, s3)))
        for i in range(four, num):
            k0 = kv[rows[i]]
            s0 = np.float32(0.0)
            for d in range(head_size):
                s0 += qg[d] * k0[d]
            scores[i] = s0
            top = max(top, s0)
        new_max = max(m[g], top)
        alpha = np.float32(math.exp(m[g] - new_max))
        total = l[g] * alpha
        exp_shifted(scores, num, new_max, bits)
        for i in range(num):
            total += scores[i]
        l[g] = total
        m[g] = new_max
        if weighted:
            for i in range(num):
                scores[i] *= vw[i]
        for d in range(head_size):
            ag[d] *= alpha
        for i in range(0, four, 4):
            v0, v1, v2, v3 = kv[rows[i]], kv[rows[i + 1]], kv[rows[i + 2]], kv[rows[i + 3]]
            p0, p1, p2, p3 = scores[i], scores[i + 1], scores[i + 2], scores[i + 3]
            for d in range(head_size):
                e = head_size + d
                ag[d] += p0 * v0[e] + p1 * v1[e] + p2 * v2[e] + p3 * v3[e]
        for i in range(four, num):
            v0 = kv[rows[i]]
            p0 = scores[i]
            for d in range(head_size):
                ag[d] += p0 * v0[head_size + d]


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _fold_range(kv, strides, block_size, table_row, head, lo, hi, q, m, l, acc, scores, bits,
                rows, weights, vw):
    """Fold the tokens at logical positions [lo, hi) page by page; returns hi - lo.
    strides: the (block, head, slot) strides of the cache in rows. weights [S]: value
    weights of positions 0..S-1 (later ones 1; S = 0: none); vw: their per-chunk scratch."""
    weighted = weights.shape[0] > 0
    pos = lo
    while pos < hi:
        page = pos // block_size
        t0 = pos - page * block_size
        t1 = min(block_size, hi - page * block_size)
        base = table_row[page] * strides[0] + head * strides[1]
        for t in range(t0, t1):
            rows[t - t0] = base + t * strides[2]
        if weighted:
            for t in range(t0, t1):
                position = page * block_size + t
                vw[t - t0] = weights[position] if position < weights.shape[0] else 1.0
        _fold(kv, rows, t1 - t0, q, m, l, acc, scores, bits, vw, weighted)
        pos = page * block_size + t1
    return max(hi - lo, 0)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _sparse_decode_kernel(query, kv, strides, block_size, block_table, seq_lens, selected,
                          page_mode, sinks, window, sink_weights, scale, out, lse, counts):
    num_rows, num_heads, head_size = query.shape
    num_kv_heads = selected.shape[1]
    group = num_heads // num_kv_heads
    for item in numba.prange(num_rows * num_kv_heads):
        n = item // num_kv_heads
        h = item - n * num_kv_heads
        ctx = seq_lens[n]
        sink_end = min(max(sinks[n], 0), ctx)
        window_start = max(ctx - window[n], sink_end)
        q = np.empty((group, head_size), np.float32)
        for g in range(group):
            for d in range(head_size):
                q[g, d] = query[n, h * group + g, d] * scale
        m = np.full(group, -np.inf, np.float32)
        l = np.zeros(group, np.float32)
        acc = np.zeros((group, head_size), np.float32)
        scores = np.empty(block_size, np.float32)
        bits = np.empty(block_size, np.int32)
        rows = np.empty(block_size, np.int64)
        vw = np.empty(block_size, np.float32)
        unweighted = sink_weights[n, h, :0]
        table = block_table[n]
        count = _fold_range(kv, strides, block_size, table, h, 0, sink_end, q, m, l, acc, scores,
                            bits, rows, sink_weights[n, h], vw)
        pending = 0         # token mode: selected tokens gathered into `rows`, folded per chunk
        for i in range(selected.shape[2]):
            entry = selected[n, h, i]
            if entry < 0:
                continue
            if page_mode:
                count += _fold_range(kv, strides, block_size, table, h,
                                     max(entry * block_size, sink_end),
                                     min(entry * block_size + block_size, window_start),
                                     q, m, l, acc, scores, bits, rows, unweighted, vw)
            elif sink_end <= entry < window_start:
                page = entry // block_size
                rows[pending] = (table[page] * strides[0] + h * strides[1]
                                 + (entry - page * block_size) * strides[2])
                pending += 1
                if pending == block_size:
                    _fold(kv, rows, pending, q, m, l, acc, scores, bits, vw, False)
                    count += pending
                    pending = 0
        if pending:
            _fold(kv, rows, pending, q, m, l, acc, scores, bits, vw, False)
            count += pending
        count += _fold_range(kv, strides, block_size, table, h, window_start, ctx, q, m, l, acc,
                             scores, bits, rows, unweighted, vw)
        counts[n, h] = count
        for g in range(group):
            if l[g] > 0:
                for d in range(head_size):
                    out[n, h * group + g, d] = acc[g, d] / l[g]
                lse[n, h * group + g] = m[g] + math.log(l[g])
            else:
                for d in range(head_size):
                    out[n, h * group + g, d] = 0.0
                lse[n, h * group + g] = -np.inf


def _rows(kv_cache: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The cache's memory as rows [R, 2D] (one per token record) and the row strides of
    (block, head, slot). vLLM's caches qualify (any order of the first three dims); any
    other layout is copied first."""
    row = kv_cache.shape[3]
    strides, offset = kv_cache.stride(), kv_cache.storage_offset()
    if strides[3] != 1 or offset % row or any(stride % row for stride in strides[:3]):
        kv_cache = kv_cache.contiguous()
        strides, offset = kv_cache.stride(), 0
    span = sum((size - 1) * stride for size, stride in zip(kv_cache.shape, strides)) + 1
    rows = kv_cache.as_strided((-(-span // row), row), (row, 1), offset)
    return rows.detach().numpy(), np.array([s // row for s in strides[:3]], dtype=np.int64)


def _per_row(value, num_rows: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.to(torch.int64).expand(num_rows).contiguous().numpy()
    return np.full(num_rows, int(value), dtype=np.int64)


def _sink_weights(weights, num_rows: int, num_kv_heads: int) -> np.ndarray:
    if weights is None:
        return np.zeros((num_rows, num_kv_heads, 0), np.float32)
    if weights.dim() != 3 or tuple(weights.shape[:2]) != (num_rows, num_kv_heads):
        raise ValueError(f"cpu_sparse_paged_decode: sink_weights {tuple(weights.shape)}; "
                         f"expected [{num_rows}, {num_kv_heads}, S]")
    return weights.detach().to(torch.float32).contiguous().numpy()


def cpu_sparse_paged_decode(query: torch.Tensor, kv_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor,
                            selected: torch.Tensor, mode: str = "page",
                            num_sink_tokens: int | torch.Tensor = 0,
                            local_window: int | torch.Tensor = 0, scale: float | None = None,
                            return_lse: bool = False,
                            sink_weights: torch.Tensor | None = None):
    """Sparse paged decode on the CPU; see the module docstring.

    sink_weights [N, Hkv, S] fp32 (optional, CPU only: SparseK's p): sink token i < S of
    row n and KV head h has its value scaled by sink_weights[n, h, i] after the softmax,
    without renormalising (sinks past S: weight 1); nothing else is weighted.

    Returns (out [N, Hq, D] fp32, attended [N, Hkv] int64: tokens each (sequence, KV head)
    attended), plus lse [N, Hq] fp32 when `return_lse`.
    """
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: expected one of {_MODES}")
    for name, tensor in (("query", query), ("kv_cache", kv_cache)):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(f"cpu_sparse_paged_decode: {name} must be a float32 CPU tensor, "
                             f"got {tensor.dtype} on {tensor.device}")
    num_rows, num_heads, head_size = query.shape
    num_kv_heads = kv_cache.shape[1]
    if num_heads % num_kv_heads or kv_cache.shape[3] != 2 * head_size:
        raise ValueError(f"cpu_sparse_paged_decode: query {tuple(query.shape)} does not fit "
                         f"kv_cache {tuple(kv_cache.shape)}")
    scale = head_size ** -0.5 if scale is None else float(scale)
    out = torch.empty(num_rows, num_heads, head_size, dtype=torch.float32)
    lse = torch.empty(num_rows, num_heads, dtype=torch.float32)
    counts = torch.empty(num_rows, num_kv_heads, dtype=torch.int64)
    if num_rows:
        match_torch_threads()
        kv, strides = _rows(kv_cache)
        _sparse_decode_kernel(
            query.detach().contiguous().numpy(), kv, strides, kv_cache.shape[2],
            block_table.to(torch.int64).numpy(), seq_lens.to(torch.int64).numpy(),
            selected.to(torch.int64).numpy(), mode == "page",
            _per_row(num_sink_tokens, num_rows), _per_row(local_window, num_rows),
            _sink_weights(sink_weights, num_rows, num_kv_heads), np.float32(scale), out.numpy(),
            lse.numpy(), counts.numpy())
    return (out, counts, lse) if return_lse else (out, counts)
