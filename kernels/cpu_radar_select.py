# SPDX-License-Identifier: Apache-2.0
"""Radar's whole decode selection on the CPU (Numba): budgets, page scores, top-k segments.

The same result as ``RadarPolicy.select`` with the torch mechanism: for each row and KV
head, the estimated attention share of every candidate page (``radar_score``'s module
docstring defines it: the softmax over the row's candidate pages of log(qf . summaries)
+ page_max (+ scale * q . means), summed over the group's query heads), summed per
segment of ``seg_pages`` pages, and the pages of the k best segments in rank order, -1
padded; with each row's sink and window sizes.

Why it exists: in torch the selection is about 35 small ops a layer (the query's random
features, the per-row budget arithmetic, the segment scatter, top-k and page expansion).
On a 2-core CPU each costs 10-20 us of dispatch, about 0.9 ms a layer at batch 8, as much
as the page scores themselves. Here one serial call sizes the rows and one parallel call
over (row, KV head) does the rest, reading the page summaries in place, once per KV head
for all its query heads, with the exponentials in vector loops (``cpu_exp``).

Reference: ``vllm_sparse.policies.radar.selection_sizes`` and ``top_segment_pages`` on
``radar_score.radar_page_scores_ref`` (the policy's torch path).
"""

import math

import numba
import numpy as np
import torch

from .cpu_exp import exp_shifted
from .numba_setup import FASTMATH, match_torch_threads


@numba.njit(cache=True, nogil=True)
def _row_sizes(seq_lens, budgets, num_sink_tokens, local_window, aspect_ratio, block_size):
    """Per row: sinks, window, candidate pages, pages per segment, segments, segments kept
    ([6, N]): `selection_sizes` of the policy (and its `segment_pages`) without torch ops."""
    num_rows = seq_lens.shape[0]
    sizes = np.empty((6, num_rows), np.int64)
    for n in range(num_rows):
        seq_len, budget = seq_lens[n], budgets[n]
        sinks = min(budget, num_sink_tokens)
        window = min(budget - sinks, local_window)
        window_start = max(seq_len - window, 0)
        pages = min(-(-window_start // block_size), seq_len // block_size)
        t_ref = 2.0 ** math.floor(math.log2(max(seq_len, 1)))
        seg_pages = max(1, int(np.rint(math.sqrt(t_ref) / aspect_ratio / block_size)))
        segments = -(-pages // seg_pages)
        spare = budget - sinks - window
        sizes[0, n], sizes[1, n], sizes[2, n] = sinks, window, pages
        sizes[3, n], sizes[4, n] = seg_pages, segments
        sizes[5, n] = min(max(spare // (seg_pages * block_size), 0), segments)
    return sizes


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _query_features(query, n, first_head, projection, sqrt_scale, feats, bits):
    """feats[g] = phi(q) / max phi(q) for the query heads first_head + g of row n: the
    positive random features (exp of [w.q' - |q'|^2/2, -w.q' - |q'|^2/2], q' = q sqrt(scale)),
    normalised by their max in the log domain. The projection is read row by row (unit
    stride over the features, which vectorises)."""
    group, features = feats.shape
    half_features = features // 2
    head_size = projection.shape[0]
    for g in range(group):
        fg = feats[g]
        half_norm = np.float32(0.0)
        for f in range(half_features):
            fg[f] = np.float32(0.0)
        for d in range(head_size):
            qd = query[n, first_head + g, d] * sqrt_scale
            half_norm += qd * qd
            row = projection[d]
            for f in range(half_features):
                fg[f] += qd * row[f]
        half_norm *= np.float32(0.5)
        top = np.float32(0.0)
        for f in range(half_features):
            top = max(top, abs(fg[f]))
        for f in range(half_features):
            fg[half_features + f] = -fg[f] - half_norm
            fg[f] -= half_norm
        exp_shifted(fg, features, top - half_norm, bits)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _select_kernel(query, projection, sqrt_scale, scale, summaries, page_max, means, has_means,
                   block_table, sizes, c_max, out_pages):
    num_rows, num_heads, head_size = query.shape
    num_kv_heads = summaries.shape[1]
    group = num_heads // num_kv_heads
    features = 2 * projection.shape[1]
    for item in numba.prange(num_rows * num_kv_heads):
        n = item // num_kv_heads
        h = item - n * num_kv_heads
        pages, seg_pages, segments, keep = sizes[2, n], sizes[3, n], sizes[4, n], sizes[5, n]
        for j in range(out_pages.shape[2]):
            out_pages[n, h, j] = -1
        if keep <= 0:
            continue
        feats = np.empty((group, features), np.float32)
        bits = np.empty(max(pages, features), np.int32)
        _query_features(query, n, h * group, projection, sqrt_scale, feats, bits)
        # page logits of the whole group, one pass over the pages (each page's summary is
        # read from memory once for the group)
        logits = np.empty((group, pages), np.float32)
        for p in range(pages):
            block = block_table[n, p]
            summary = summaries[block, h]
            for g in range(group):
                fg = feats[g]
                dot = np.float32(0.0)
                for f in range(features):
                    dot += fg[f] * summary[f]
                logit = np.float32(math.log(dot)) + page_max[block, h] if dot > 0 else -np.inf
                if has_means:
                    mean = means[block, h]
                    centre = np.float32(0.0)
                    for d in range(head_size):
                        centre += query[n, h * group + g, d] * mean[d]
                    logit += centre * scale
                logits[g, p] = logit
        # each head's softmax over the row's candidate pages, summed over the group
        shares = np.zeros(pages, np.float32)
        for g in range(group):
            lg = logits[g]
            top = -np.inf
            for p in range(pages):
                top = max(top, lg[p])
            if top == -np.inf:      # nothing summarised: this head adds nothing
                continue
            exp_shifted(lg, pages, top, bits)
            total = np.float32(0.0)
            for p in range(pages):
                total += lg[p]
            for p in range(pages):
                shares[p] += lg[p] / total
        # segment scores, the `keep` best (ties to the lower index), their pages in rank order
        seg_scores = np.zeros(segments, np.float32)
        for p in range(pages):
            seg_scores[p // seg_pages] += shares[p]
        ranked = np.argsort(-seg_scores, kind="mergesort")
        for r in range(keep):
            first = ranked[r] * seg_pages
            for c in range(seg_pages):
                if first + c < pages:
                    out_pages[n, h, r * c_max + c] = first + c


def cpu_radar_select(query: torch.Tensor, summaries: torch.Tensor, page_max: torch.Tensor,
                     means: torch.Tensor | None, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, budgets: torch.Tensor, projection: torch.Tensor,
                     scale: float, *, num_sink_tokens: int, local_window: int,
                     aspect_ratio: float, block_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Radar's selection for decode queries, all on the CPU.

    query [N, Hq, D] (any float dtype); summaries [num_blocks, Hkv, 2n], page_max
    [num_blocks, Hkv] and means [num_blocks, Hkv, D] (or None) fp32; block_table [N, >= P]
    int; seq_lens, budgets [N] int; projection [D, n] fp32. Returns pages [N, Hkv, K]
    (logical page ids in rank order, -1 padded; K = max segments kept x max pages per
    segment, 0 when no row keeps a segment), sinks [N] and window [N] int64.
    """
    num_rows, num_heads, head_size = query.shape
    num_kv_heads = summaries.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"cpu_radar_select: Hq={num_heads} is not a multiple of "
                         f"Hkv={num_kv_heads}")
    if projection.shape[0] != head_size:
        raise ValueError(f"cpu_radar_select: projection {tuple(projection.shape)} does not "
                         f"match head size {head_size}")
    sizes = _row_sizes(seq_lens.to(torch.int64).numpy(), budgets.to(torch.int64).numpy(),
                       num_sink_tokens, local_window, float(aspect_ratio), block_size)
    k_max = int(sizes[5].max()) if num_rows else 0
    c_max = int(sizes[3].max()) if num_rows else 1
    out_pages = torch.full((num_rows, num_kv_heads, k_max * c_max if k_max else 0), -1,
                           dtype=torch.int64)
    if k_max:
        match_torch_threads()
        no_means = np.zeros((1, 1, 1), np.float32)
        _select_kernel(query.float().contiguous().numpy(), projection.contiguous().numpy(),
                       np.float32(math.sqrt(scale)), np.float32(scale), summaries.numpy(),
                       page_max.numpy(), no_means if means is None else means.numpy(),
                       means is not None, block_table.to(torch.int64).numpy(), sizes, c_max,
                       out_pages.numpy())
    sizes_t = torch.from_numpy(sizes)
    return out_pages, sizes_t[0], sizes_t[1]
