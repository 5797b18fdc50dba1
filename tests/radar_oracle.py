# SPDX-License-Identifier: Apache-2.0
"""An independent, deliberately plain Radar: the oracle the backend is checked against.

It works on one sequence's contiguous post-RoPE keys (no pages, no block table, no
per-page state): every random feature is recomputed from the keys, in float64, with
loops over heads and segments. Only the documented rule is shared with the backend
(see `vllm_sparse/policies/radar.py`), plus the seeded projection, which is an input.
"""

import math

import torch

from vllm_sparse.config import RadarConfig
from vllm_sparse.policies.radar import radar_projection


def radar_mask(query: torch.Tensor, keys: torch.Tensor, config: RadarConfig, block_size: int,
               budget: int, scale: float) -> torch.Tensor:
    """Attended tokens [Hkv, T] of one decode query [Hq, D] over keys [Hkv, T, D]."""
    num_kv_heads, length, head_size = keys.shape
    group = query.shape[0] // num_kv_heads
    if budget >= length:
        return torch.ones(num_kv_heads, length, dtype=torch.bool)
    sinks = min(config.num_sink_tokens, budget)
    window = min(config.local_window, budget - sinks)
    window_start = max(0, length - window)
    num_pages = min(math.ceil(window_start / block_size), length // block_size)
    t_ref = 2 ** math.floor(math.log2(length))
    seg = max(1, round(math.sqrt(t_ref) / config.aspect_ratio / block_size))
    num_segments = math.ceil(num_pages / seg)
    k = min(max(0, (budget - sinks - window) // (seg * block_size)), num_segments)
    w = radar_projection(head_size, config.projection_dim, config.seed).double()

    def features(x):  # phi(x) up to a constant factor, shifted by a per-call max
        x = x.double() * math.sqrt(scale)
        proj = x @ w
        half = (x * x).sum(-1, keepdim=True) / 2
        return torch.cat([proj - half, -proj - half], dim=-1)

    pos = torch.arange(length)
    mask = (pos < sinks) | (pos >= length - window)
    mask = mask.expand(num_kv_heads, length).clone()
    for h in range(num_kv_heads):
        paged = keys[h, : num_pages * block_size].double().view(num_pages, block_size, -1)
        means = paged.mean(dim=1, keepdim=True) if config.center_keys else torch.zeros_like(paged[:, :1])
        key_feats = features(paged - means)                                 # [P, bs, F]
        page_score = torch.zeros(num_pages, dtype=torch.float64)
        for g in range(group):
            q = query[h * group + g].double()
            q_feats = features(q)                                           # [F]
            logits = torch.logsumexp(q_feats + key_feats, dim=-1)           # [P, bs]
            per_page = torch.logsumexp(logits, dim=-1) + scale * (means[:, 0] @ q)
            page_score += torch.softmax(per_page, dim=0)
        seg_score = torch.stack([page_score[s * seg:(s + 1) * seg].sum()
                                 for s in range(num_segments)]) if num_segments else None
        if k:
            for s in torch.argsort(seg_score, descending=True)[:k].tolist():
                lo, hi = s * seg * block_size, min((s + 1) * seg, num_pages) * block_size
                mask[h, lo:hi] = True
    return mask
