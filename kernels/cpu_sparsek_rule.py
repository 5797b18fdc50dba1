# SPDX-License-Identifier: Apache-2.0
"""SparseK's attention rule for a block of prefill queries on the CPU (Numba).

The same result as ``vllm_sparse.sparsek.scorer.attention_rule`` (its reference, with
``kernels="torch"``): for the query at position i, the window i - W < j <= i with weight 1,
and among its c_i = max(0, i - W + 1) candidates (the tokens j < c_i) all of them with
weight 1 when c_i <= k, else the top-k in the total order (u descending, position
ascending) with weight p_j = clip(u_j - tau_i, 0, 1), tau_i SPARSEK's threshold over every
candidate (``kernels/sparsek_topk.py`` defines it and its conventions).

Why it exists: the reference ranks and solves every query's row on its own, a k-th value
over [Hkv, Q, n] and an exact sort-based SPARSEK in float64 over [Hkv * Q, n], about 90%
of SparseK's prefill on a CPU (7.5K context: over 10x the attention itself). But the
candidates of consecutive queries are nested prefixes of one sequence of query-independent
scores, so one sweep per KV head serves them all: the k-th best rank of a prefix (a max-heap
of the k best ranks) and tau of a prefix (a descending list of the scores that can still
matter, plus a short walk over the breakpoints of f(t) = sum clip(z - t, 0, 1) near the
root) are updated as each candidate joins. The sweep returns per (KV head, query) the rank
threshold and tau; the [Hkv, Q, n] masks and weights are then a few elementwise torch ops.

Exactness: the attended set is decided on integer ranks, so it is the reference's exactly.
tau is exact in float64 as in the reference (the same closed form on the root's piece, the
same flat-case midpoint), then rounded to float32 and applied as the reference does, so
the weights agree to float32 rounding of tau (in practice bit for bit). No backward: this is
for inference (the scorer trains through the reference).
"""

import numba
import numpy as np
import torch

from .cpu_sparsek_tau import insert_score, solve_tau
from .numba_setup import match_torch_threads


@numba.njit(cache=True, nogil=True)
def _sweep_head(u, by_rank, ranks, counts, order, k, rank_limit, tau, buf, heap):
    """One KV head. u [n] float64 scores; by_rank [n] positions in the total order, ranks
    [n] its inverse; counts [Q] candidates per query, order [Q] the queries by count. Writes
    rank_limit [Q] (the top-k are the candidates of rank <= it) and tau [Q] (-inf: every
    candidate, p = 1)."""
    n = u.shape[0]
    first = counts[order[0]] if order.shape[0] else 0
    # the prefix `first` in rank order: the k best ranks (a descending array is a max-heap)
    # and the scores that can matter for tau, descending
    size, m = 0, 0
    for r in range(n):
        j = by_rank[r]
        if j >= first:
            continue
        if size < k:
            heap[size] = r
            size += 1
        if m > k and u[j] <= buf[k] - 1.0:
            break                                        # this and every later one: <= z_(k+1) - 1
        buf[m] = u[j]
        m += 1
    heap[:size] = heap[:size][::-1].copy()
    c = first
    for qi in range(order.shape[0]):
        q = order[qi]
        while c < counts[q]:                             # candidate c joins
            x, rc = u[c], ranks[c]
            if size < k:                                 # max-heap push
                i = size
                size += 1
                while i > 0 and heap[(i - 1) // 2] < rc:
                    heap[i] = heap[(i - 1) // 2]
                    i = (i - 1) // 2
                heap[i] = rc
            elif rc < heap[0]:                           # replaces the worst kept rank
                i = 0
                while True:
                    child = 2 * i + 1
                    if child >= k:
                        break
                    if child + 1 < k and heap[child + 1] > heap[child]:
                        child += 1
                    if heap[child] <= rc:
                        break
                    heap[i] = heap[child]
                    i = child
                heap[i] = rc
            m = insert_score(buf, m, x, k)
            c += 1
        if c <= k:
            rank_limit[q] = n
            tau[q] = -np.inf
        else:
            rank_limit[q] = heap[0]
            tau[q] = solve_tau(buf, m, k)


@numba.njit(parallel=True, cache=True, nogil=True)
def _rule_kernel(u, by_rank, ranks, counts, order, k, rank_limit, tau):
    """Every KV head in parallel: u, by_rank, ranks [H, n] -> rank_limit, tau [H, Q]."""
    heads, n = u.shape
    for h in numba.prange(heads):
        _sweep_head(u[h], by_rank[h], ranks[h], counts, order, k, rank_limit[h], tau[h],
                    np.empty(n + 1, np.float64), np.empty(max(k, 1), np.int64))


@numba.njit(parallel=True, cache=True, nogil=True)
def _mark_kernel(by_rank, counts, pos, k, marks):
    """marks [H, n]: the positions some query of the block attends at each KV head (its
    window, and its top-k: the first k candidates in rank order, or all when c <= k)."""
    heads = marks.shape[0]
    for h in numba.prange(heads):
        for q in range(counts.shape[0]):
            c = counts[q]
            for j in range(c, pos[q] + 1):
                marks[h, j] = True
            if c <= k:
                for j in range(c):
                    marks[h, j] = True
                continue
            found, r = 0, 0
            while found < k:
                j = by_rank[h, r]
                r += 1
                if j < c:
                    marks[h, j] = True
                    found += 1


@numba.njit(parallel=True, cache=True, nogil=True)
def _fill_kernel(u, ranks, pos, counts, rank_limit, tau, columns, attended, weights):
    """attended / weights [H, Q, L] over the key positions columns [H, L]: a candidate j < c
    of rank <= the limit gets clip(u - tau, 0, 1) (in u's dtype, as the reference), the
    window c <= j <= pos gets 1, the rest 0."""
    heads, num_queries, width = weights.shape
    one, zero = weights.dtype.type(1.0), weights.dtype.type(0.0)
    for hq in numba.prange(heads * num_queries):
        h, q = hq // num_queries, hq % num_queries
        c, last, limit, t = counts[q], pos[q], rank_limit[h, q], tau[h, q]
        for col in range(width):
            j = columns[h, col]
            if j < c:
                keep = ranks[h, j] <= limit
                attended[h, q, col] = keep
                weights[h, q, col] = min(max(u[h, j] - t, zero), one) if keep else zero
            else:
                attended[h, q, col] = j <= last
                weights[h, q, col] = one if j <= last else zero


def cpu_sparsek_rule(u: torch.Tensor, k: int, window: int, query_pos: torch.Tensor,
                     compact: bool = False):
    """SparseK's rule on the CPU: u [Hkv, n] scores of the tokens at positions 0..n-1,
    query_pos [Q] (< n, any order) -> (attended [Hkv, Q, n] bool, value weights [Hkv, Q, n]
    in u's dtype: 1 on the window, p on the top-k candidates, 0 elsewhere). The same as
    ``attention_rule(u, k, window, query_pos, kernels="torch")``, without its gradient.

    compact=True -> (columns [Hkv, L] int64, attended [Hkv, Q, L], weights [Hkv, Q, L]): only
    the L key positions per KV head that some query attends (ascending; a head with fewer
    is padded with positions nobody attends), about k + W + Q of the n when the queries
    are consecutive, so attention over them costs O(budget) per query, not O(n)."""
    if k < 1 or window < 0:
        raise ValueError(f"SparseK: k={k}, window={window}; allowed: k >= 1, window >= 0")
    if u.dim() != 2 or u.device.type != "cpu":
        raise ValueError(f"cpu_sparsek_rule: u must be [Hkv, n] on the CPU, got "
                         f"{tuple(u.shape)} on {u.device}")
    heads, n = u.shape
    pos = query_pos.to(torch.int64).contiguous()
    counts = (pos - window + 1).clamp(min=0)
    by_rank = torch.sort(-u.detach(), dim=-1, stable=True).indices
    ranks = torch.empty_like(by_rank).scatter_(-1, by_rank, torch.arange(n).expand_as(by_rank))
    rank_limit = torch.zeros(heads, len(pos), dtype=torch.int64)
    tau = torch.zeros(heads, len(pos), dtype=torch.float64)
    match_torch_threads()
    if len(pos):
        _rule_kernel(u.detach().double().contiguous().numpy(), by_rank.numpy(), ranks.numpy(),
                     counts.numpy(), torch.argsort(counts, stable=True).numpy(), int(k),
                     rank_limit.numpy(), tau.numpy())
    if compact:
        marks = torch.zeros(heads, n, dtype=torch.bool)
        _mark_kernel(by_rank.numpy(), counts.numpy(), pos.numpy(), int(k), marks.numpy())
        width = int(marks.sum(-1).max()) if n else 0
        columns = torch.sort((~marks).to(torch.uint8), dim=-1, stable=True).indices[:, :width]
    else:
        columns = torch.arange(n).expand(heads, n)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    attended = torch.empty(heads, len(pos), columns.shape[1], dtype=torch.bool)
    weights = torch.empty(heads, len(pos), columns.shape[1], dtype=compute)
    _fill_kernel(u.detach().to(compute).contiguous().numpy(), ranks.numpy(), pos.numpy(),
                 counts.numpy(), rank_limit.numpy(), tau.to(compute).numpy(),
                 columns.contiguous().numpy(), attended.numpy(), weights.numpy())
    weights = weights.to(u.dtype)
    return (columns, attended, weights) if compact else (attended, weights)
