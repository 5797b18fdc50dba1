# SPDX-License-Identifier: Apache-2.0
"""Radar page scores on the CPU (Numba), reading the page summaries in place.

Same arguments and result as ``radar_score.radar_page_scores`` (the Triton kernel; its
module docstring defines the scores): shares [N, Hkv, P] fp32, for each row and KV head
the softmax over the row's candidate pages of log(qf . summaries[b, h]) + page_max[b, h]
(+ scale * q . means[b, h] with centred keys), summed over the query heads of the group.

Why it exists: the torch path gathers every candidate page's summary (2n fp32) and mean
key (D fp32) into new [N, Hkv, P, .] tensors each step, a few MB per layer at 8K context
and batch 8; here each (row, KV head) reads them where they are, in parallel over (row,
KV head) on Numba's threads. The query features (small) are computed in torch.

Reference: ``radar_score.radar_page_scores_ref`` (the policy's torch math).
"""

import math

import numba
import numpy as np
import torch

from .numba_setup import FASTMATH, match_torch_threads


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _page_scores_kernel(q_feats, q_scaled, summaries, page_max, means, has_means, block_table,
                        num_pages, shares):
    num_rows, num_kv_heads, group, num_features = q_feats.shape
    head_size = q_scaled.shape[3]
    width = shares.shape[2]
    for item in numba.prange(num_rows * num_kv_heads):
        n = item // num_kv_heads
        h = item - n * num_kv_heads
        pages = min(num_pages[n], width)
        for p in range(width):
            shares[n, h, p] = 0.0
        if pages <= 0:
            continue
        logits = np.empty(pages, np.float32)
        for g in range(group):
            top = -np.inf
            for p in range(pages):
                block = block_table[n, p]
                dot = np.float32(0.0)
                for f in range(num_features):
                    dot += q_feats[n, h, g, f] * summaries[block, h, f]
                logit = np.float32(math.log(dot)) + page_max[block, h] if dot > 0 else -np.inf
                if has_means:
                    centre = np.float32(0.0)
                    for d in range(head_size):
                        centre += q_scaled[n, h, g, d] * means[block, h, d]
                    logit += centre
                logits[p] = logit
                top = max(top, logit)
            if top == -np.inf:      # nothing summarised: this head adds nothing
                continue
            total = np.float32(0.0)
            for p in range(pages):
                logits[p] = math.exp(logits[p] - top)
                total += logits[p]
            for p in range(pages):
                shares[n, h, p] += logits[p] / total


def cpu_radar_page_scores(query: torch.Tensor, summaries: torch.Tensor, page_max: torch.Tensor,
                          block_table: torch.Tensor, num_pages: torch.Tensor,
                          projection: torch.Tensor, scale: float, *, max_pages: int | None = None,
                          means: torch.Tensor | None = None) -> torch.Tensor:
    """Estimated attention share of each candidate page, summed over the group.

    query [N, Hq, D] (any float dtype); summaries [num_blocks, Hkv, 2n], page_max
    [num_blocks, Hkv] and means [num_blocks, Hkv, D] (or None) fp32 on the CPU;
    block_table [N, >= P] and num_pages [N] int; projection [D, n] fp32. Returns shares
    [N, Hkv, P] fp32, P = max_pages (default max(num_pages)); 0 for p >= num_pages[i].
    """
    num_rows, num_heads, head_size = query.shape
    num_kv_heads = summaries.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"cpu_radar_page_scores: Hq={num_heads} is not a multiple of "
                         f"Hkv={num_kv_heads}")
    width = int(num_pages.max()) if max_pages is None else int(max_pages)
    group = num_heads // num_kv_heads
    query = query.float()
    q = query * math.sqrt(scale)
    proj = q @ projection
    half_norm = (q * q).sum(-1, keepdim=True) / 2
    log_feats = torch.cat([proj - half_norm, -proj - half_norm], dim=-1)
    # exp(-87) is float32's smallest normal: below it exp() is dominated by slow denormal
    # arithmetic on x86 (10x here), for terms that add nothing next to the max feature's 1
    q_feats = torch.exp((log_feats - log_feats.amax(-1, keepdim=True)).clamp(min=-87.0))
    q_feats = q_feats.reshape(num_rows, num_kv_heads, group, q_feats.shape[-1]).contiguous()
    q_scaled = (query * scale).reshape(num_rows, num_kv_heads, group, head_size).contiguous()
    shares = torch.empty(num_rows, num_kv_heads, width, dtype=torch.float32)
    no_means = np.zeros((1, 1, 1), np.float32)
    if num_rows and width:
        match_torch_threads()
        _page_scores_kernel(q_feats.numpy(), q_scaled.numpy(), summaries.numpy(),
                            page_max.numpy(), no_means if means is None else means.numpy(),
                            means is not None, block_table.to(torch.int64).numpy(),
                            num_pages.to(torch.int64).numpy(), shares.numpy())
    return shares
