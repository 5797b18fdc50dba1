# SPDX-License-Identifier: Apache-2.0
"""Radar page summaries and page scores (Triton): the two hot parts of `RadarPolicy`.

Both share one feature map, so they live together (one job: Radar's page statistics).
For x = a key or query [D], x' = x * sqrt(scale) and the projection W [D, n] (fp32):

    log_phi(x) = [x'W - |x'|^2 / 2, -x'W - |x'|^2 / 2]        (2n log-features, fp32)

* `radar_summarize_pages` (public entry point 1) writes, for each physical block b of
  `blocks` [M] (int32/int64; entries < 0 are skipped, so a fixed-size padded list works)
  and KV head h, the page max m = max over the block's tokens and features of
  log_phi(k) into `page_max[b, h]` and `summaries[b, h, :] = sum_t exp(log_phi(k_t) - m)`.
  Every slot of the block is used (a page is summarised once it is full).
  Grid (M, Hkv / HEADS): a program loads the keys of HEADS KV heads of one block as one
  [HEADS * block_size, D] tile and makes two passes over feature tiles (max, then sum).

* `radar_page_scores` (public entry point 2) returns shares [N, Hkv, P] fp32 for query
  [N, Hq, D]: per query head, qf = exp(log_phi(q) - max(log_phi(q))), and for the logical
  page p of row i with block b = block_table[i, p],
  logit[p] = log(qf . summaries[b, h]) + page_max[b, h]; a softmax over the row's pages
  p < num_pages[i], summed over the query heads of the KV head's group (head j uses KV head
  j // (Hq // Hkv)). Pages >= num_pages[i] get 0; a head whose logits are all -inf
  (e.g. unwritten pages) adds 0 (torch's softmax NaN, turned into 0 by `nan_to_num`).
  Kernel 1, grid (N, Hkv, splits): computes the group's q-features in registers (fused),
  walks its share of BLOCK_P-page tiles, writes the logits to an fp32 scratch [N, Hq, P]
  and an online (max, sum-exp) per head and split. Kernel 2, grid (N, Hkv, P tiles):
  merges the split statistics and writes the group-summed shares. Summaries are read
  once (they are 2n fp32 per page and head; the logits scratch is GROUP fp32 per page).

Centred keys (`means` given: `RadarConfig.center_keys`, the policy's default): the
summaries are those of k - mu instead of k, mu [D] the mean of the page's block_size keys
(fp32, per block and KV head), stored in `means[b, h]`; the page scores add
scale * (q . means[b, h]) (raw fp32 query) to each query head's logit before the softmax.
Since sum_t exp(s q.k_t) = exp(s q.mu) sum_t exp(s q.(k_t - mu)), the estimate has the same
expectation with a much smaller variance. The summarize kernel reduces its key tile to mu
before the feature passes; the logits kernel adds a chunked [group, D] x [D, BLOCK_P] dot per
page tile. With `means=None` (the paper's estimator) the kernels are compiled without it.

All dots run on fp32 operands with input_precision "ieee", so the kernels follow the
fp32 torch math of `RadarPolicy` (`*_ref` below reproduce it exactly) for any key dtype.
"""

import math

import torch
import triton
import triton.language as tl

from .split_merge import default_num_splits


@triton.jit
def _summarize_kernel(
    kv_ptr,  # [num_blocks, Hkv, PAGE_SIZE, 2*D]
    blocks_ptr,  # [M] physical block ids, < 0: skip
    w_ptr,  # [D, n] fp32
    summ_ptr,  # [num_blocks, Hkv, 2n] fp32
    pmax_ptr,  # [num_blocks, Hkv] fp32
    mean_ptr,  # [num_blocks, Hkv, D] fp32 (HAS_MEANS; unused otherwise)
    num_kv_heads,
    sqrt_scale,
    stride_kv_block, stride_kv_head, stride_kv_tok, stride_kv_dim,
    stride_blocks,
    stride_w_dim, stride_w_feat,
    stride_s_block, stride_s_head, stride_s_feat,
    stride_pm_block, stride_pm_head,
    stride_mu_block, stride_mu_head, stride_mu_dim,
    HAS_MEANS: tl.constexpr,  # centre the keys on their page mean (and store it)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    PAGE_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # PAGE_SIZE padded to a power of two
    HEADS: tl.constexpr,  # KV heads per program (power of two); rows = HEADS * BLOCK_T >= 16
    PROJ_DIM: tl.constexpr,  # n
    BLOCK_F: tl.constexpr,  # features per tile (power of two >= 16)
):
    raw = tl.load(blocks_ptr + tl.program_id(0).to(tl.int64) * stride_blocks).to(tl.int64)
    block = tl.maximum(raw, 0)
    # rows r = (head r // BLOCK_T, token r % BLOCK_T) of this program's heads
    offs_r = tl.arange(0, HEADS * BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    head_r = tl.program_id(1) * HEADS + offs_r // BLOCK_T
    tok_r = offs_r % BLOCK_T
    # block validity enters the masks as vectors: a scalar & vector mask fails under TRITON_INTERPRET
    r_mask = (tok_r < PAGE_SIZE) & (head_r < num_kv_heads)
    r_ok = r_mask & (offs_r * 0 + raw >= 0)
    h_ok = (offs_h < num_kv_heads) & (offs_h * 0 + raw >= 0)
    d_mask = offs_d < HEAD_DIM
    k_ptrs = (kv_ptr + block * stride_kv_block + head_r.to(tl.int64)[:, None] * stride_kv_head
              + tok_r[:, None] * stride_kv_tok + offs_d[None, :] * stride_kv_dim)
    if HAS_MEANS:
        # mu = mean of each head's PAGE_SIZE keys (padded rows load 0); features of k - mu
        k = tl.load(k_ptrs, mask=r_ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        mu = tl.sum(tl.reshape(k, [HEADS, BLOCK_T, BLOCK_D]), 1) / PAGE_SIZE  # [HEADS, BLOCK_D]
        tl.store(mean_ptr + block * stride_mu_block + offs_h.to(tl.int64)[:, None] * stride_mu_head
                 + offs_d[None, :] * stride_mu_dim, mu, mask=h_ok[:, None] & d_mask[None, :])
        mu_r = tl.reshape(tl.broadcast_to(mu[:, None, :], [HEADS, BLOCK_T, BLOCK_D]), [HEADS * BLOCK_T, BLOCK_D])
        x = tl.where(r_ok[:, None] & d_mask[None, :], k - mu_r, 0.0) * sqrt_scale
    else:
        x = tl.load(k_ptrs, mask=r_ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32) * sqrt_scale
    half_norm = tl.sum(x * x, 1) / 2  # [ROWS]

    # pass 1: page max per head; max(f+, f-) of one projection is |x'w| - |x'|^2/2
    w_ptrs = w_ptr + offs_d[:, None] * stride_w_dim + tl.arange(0, BLOCK_F)[None, :] * stride_w_feat
    head_max = tl.full([HEADS], float("-inf"), dtype=tl.float32)
    for f0 in range(0, PROJ_DIM, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_mask = offs_f < PROJ_DIM
        w = tl.load(w_ptrs + f0 * stride_w_feat, mask=d_mask[:, None] & f_mask[None, :], other=0.0)
        proj = tl.dot(x, w, input_precision="ieee")  # [ROWS, BLOCK_F]
        feat_max = tl.where(r_mask[:, None] & f_mask[None, :], tl.abs(proj) - half_norm[:, None], float("-inf"))
        head_max = tl.maximum(head_max, tl.max(tl.max(tl.reshape(feat_max, [HEADS, BLOCK_T, BLOCK_F]), 2), 1))
    head_max = tl.where(offs_h < num_kv_heads, head_max, 0.0)
    row_max = tl.reshape(tl.broadcast_to(head_max[:, None], [HEADS, BLOCK_T]), [HEADS * BLOCK_T])

    # pass 2: sum over each head's tokens of exp(f - page_max), both halves
    s_ptrs = (summ_ptr + block * stride_s_block + offs_h.to(tl.int64)[:, None] * stride_s_head
              + tl.arange(0, BLOCK_F)[None, :] * stride_s_feat)
    for f0 in range(0, PROJ_DIM, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_mask = offs_f < PROJ_DIM
        w = tl.load(w_ptrs + f0 * stride_w_feat, mask=d_mask[:, None] & f_mask[None, :], other=0.0)
        proj = tl.dot(x, w, input_precision="ieee")
        shift = half_norm[:, None] + row_max[:, None]
        pos = tl.where(r_mask[:, None], tl.exp(proj - shift), 0.0)
        neg = tl.where(r_mask[:, None], tl.exp(-proj - shift), 0.0)
        pos = tl.sum(tl.reshape(pos, [HEADS, BLOCK_T, BLOCK_F]), 1)  # [HEADS, BLOCK_F]
        neg = tl.sum(tl.reshape(neg, [HEADS, BLOCK_T, BLOCK_F]), 1)
        s_mask = h_ok[:, None] & f_mask[None, :]
        tl.store(s_ptrs + f0 * stride_s_feat, pos, mask=s_mask)
        tl.store(s_ptrs + (PROJ_DIM + f0) * stride_s_feat, neg, mask=s_mask)
    tl.store(pmax_ptr + block * stride_pm_block + offs_h * stride_pm_head, head_max, mask=h_ok)


@triton.jit
def _page_logits_kernel(
    q_ptr,  # [N, Hq, D]
    w_ptr,  # [D, n] fp32
    summ_ptr,  # [num_blocks, Hkv, 2n] fp32
    pmax_ptr,  # [num_blocks, Hkv] fp32
    bt_ptr,  # [N, max_pages] block table
    npages_ptr,  # [N] candidate pages per row
    logits_ptr,  # [N, Hq, P] fp32 scratch
    m_ptr,  # [N, Hq, num_splits] fp32: max logit of the split
    l_ptr,  # [N, Hq, num_splits] fp32: sum of exp(logit - max) of the split
    mean_ptr,  # [num_blocks, Hkv, D] fp32 page mean keys (HAS_MEANS; unused otherwise)
    max_pages,  # P
    num_splits,
    sqrt_scale,
    scale,
    stride_q_seq, stride_q_head, stride_q_dim,
    stride_w_dim, stride_w_feat,
    stride_s_block, stride_s_head, stride_s_feat,
    stride_pm_block, stride_pm_head,
    stride_mu_block, stride_mu_head, stride_mu_dim,
    stride_bt_seq, stride_bt_page,
    stride_lg_seq, stride_lg_head, stride_lg_page,
    stride_ml_seq, stride_ml_head, stride_ml_split,
    HAS_MEANS: tl.constexpr,  # logit += scale * q . mu[block] (centred summaries)
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,  # head-dim chunk of the q-feature dot
    PROJ_DIM: tl.constexpr,  # n
    BLOCK_F: tl.constexpr,  # n padded to a power of two >= 16
    BLOCK_P: tl.constexpr,  # pages per tile
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_f = tl.arange(0, BLOCK_F)
    offs_p = tl.arange(0, BLOCK_P)
    g_mask = offs_g < GROUP
    f_mask = offs_f < PROJ_DIM
    heads = kvh * GROUP + offs_g

    # q-features of the group, fused: qf = exp(log_phi(q) - max), kept as two halves
    proj = tl.zeros([GROUP_PAD, BLOCK_F], dtype=tl.float32)
    sq_norm = tl.zeros([GROUP_PAD], dtype=tl.float32)
    for k0 in range(0, HEAD_DIM, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < HEAD_DIM
        q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_k[None, :] * stride_q_dim,
                    mask=g_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32) * sqrt_scale
        w = tl.load(w_ptr + offs_k[:, None] * stride_w_dim + offs_f[None, :] * stride_w_feat,
                    mask=k_mask[:, None] & f_mask[None, :], other=0.0)
        proj += tl.dot(q, w, input_precision="ieee")
        sq_norm += tl.sum(q * q, 1)
    half_norm = sq_norm / 2
    q_max = tl.max(tl.where(f_mask[None, :], tl.abs(proj) - half_norm[:, None], float("-inf")), 1)
    qf_pos = tl.where(f_mask[None, :], tl.exp(proj - half_norm[:, None] - q_max[:, None]), 0.0)
    qf_neg = tl.where(f_mask[None, :], tl.exp(-proj - half_norm[:, None] - q_max[:, None]), 0.0)

    # this split's contiguous share of the row's page tiles
    n_pages = tl.minimum(tl.load(npages_ptr + seq).to(tl.int32), max_pages)
    per_split = tl.cdiv(tl.cdiv(n_pages, BLOCK_P), num_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, tl.cdiv(n_pages, BLOCK_P))
    bt_row = bt_ptr + seq * stride_bt_seq
    s_head = summ_ptr + kvh * stride_s_head + offs_f[:, None] * stride_s_feat  # [BLOCK_F, 1]
    pm_head = pmax_ptr + kvh * stride_pm_head
    lg_rows = logits_ptr + seq * stride_lg_seq + heads[:, None] * stride_lg_head  # [GROUP_PAD, 1]
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    for tile in range(lo, hi):
        page = tile * BLOCK_P + offs_p
        valid = page < n_pages
        block = tl.load(bt_row + page * stride_bt_page, mask=valid, other=0).to(tl.int64)
        s_ptrs = s_head + (block * stride_s_block)[None, :]  # [BLOCK_F, BLOCK_P]
        s_mask = f_mask[:, None] & valid[None, :]
        s_pos = tl.load(s_ptrs, mask=s_mask, other=0.0)
        s_neg = tl.load(s_ptrs + PROJ_DIM * stride_s_feat, mask=s_mask, other=0.0)
        dot = tl.dot(qf_pos, s_pos, input_precision="ieee") + tl.dot(qf_neg, s_neg, input_precision="ieee")
        pm = tl.load(pm_head + block * stride_pm_block, mask=valid, other=float("-inf"))
        logit = tl.log(dot) + pm[None, :]
        if HAS_MEANS:
            # raw fp32 query . page mean, over head-dim chunks (q is re-read: tiny and cache-resident)
            q_mu = tl.zeros([GROUP_PAD, BLOCK_P], dtype=tl.float32)
            mu_ptrs = mean_ptr + kvh * stride_mu_head + (block * stride_mu_block)[None, :]  # [1, BLOCK_P]
            for k0 in range(0, HEAD_DIM, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < HEAD_DIM
                q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head
                            + offs_k[None, :] * stride_q_dim, mask=g_mask[:, None] & k_mask[None, :],
                            other=0.0).to(tl.float32)
                mu = tl.load(mu_ptrs + offs_k[:, None] * stride_mu_dim, mask=k_mask[:, None] & valid[None, :],
                             other=0.0)  # [BLOCK_K, BLOCK_P]
                q_mu += tl.dot(q, mu, input_precision="ieee")
            logit = logit + scale * q_mu
        logit = tl.where(valid[None, :], logit, float("-inf"))  # [GROUP_PAD, BLOCK_P]
        tl.store(lg_rows + (page * stride_lg_page)[None, :], logit, mask=g_mask[:, None] & valid[None, :])
        m_new = tl.maximum(m_i, tl.max(logit, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)
        m_i = m_new
    ml_off = seq * stride_ml_seq + heads * stride_ml_head + split * stride_ml_split
    tl.store(m_ptr + ml_off, m_i, mask=g_mask)
    tl.store(l_ptr + ml_off, l_i, mask=g_mask)


@triton.jit
def _page_shares_kernel(
    logits_ptr,  # [N, Hq, P] fp32
    m_ptr,  # [N, Hq, num_splits] fp32
    l_ptr,  # [N, Hq, num_splits] fp32
    npages_ptr,  # [N]
    out_ptr,  # [N, Hkv, P] fp32
    max_pages,  # P
    num_splits,
    stride_lg_seq, stride_lg_head, stride_lg_page,
    stride_ml_seq, stride_ml_head, stride_ml_split,
    stride_o_seq, stride_o_head, stride_o_page,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of two
    BLOCK_P: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_s = tl.arange(0, BLOCK_S)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    ml_ptrs = seq * stride_ml_seq + heads[:, None] * stride_ml_head + offs_s[None, :] * stride_ml_split
    ml_mask = g_mask[:, None] & (offs_s < num_splits)[None, :]
    m_s = tl.load(m_ptr + ml_ptrs, mask=ml_mask, other=float("-inf"))  # [GROUP_PAD, BLOCK_S]
    l_s = tl.load(l_ptr + ml_ptrs, mask=ml_mask, other=0.0)
    m = tl.max(m_s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(l_s * tl.exp(m_s - m[:, None]), 1)
    inv = tl.where(total > 0.0, 1.0 / tl.where(total > 0.0, total, 1.0), 0.0)  # all -inf: share 0

    n_pages = tl.minimum(tl.load(npages_ptr + seq).to(tl.int32), max_pages)
    page = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = page < n_pages
    logit = tl.load(logits_ptr + seq * stride_lg_seq + heads[:, None] * stride_lg_head + page[None, :] * stride_lg_page,
                    mask=g_mask[:, None] & valid[None, :], other=float("-inf"))
    share = tl.sum(tl.exp(logit - m[:, None]) * inv[:, None], 0)
    tl.store(out_ptr + seq * stride_o_seq + kvh * stride_o_head + page * stride_o_page,
             tl.where(valid, share, 0.0), mask=page < max_pages)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _check_projection(projection, head_size, device):
    assert projection.dim() == 2 and projection.shape[0] == head_size and projection.dtype == torch.float32, \
        f"projection must be fp32 [D={head_size}, n]; got {projection.dtype} {tuple(projection.shape)}"
    assert projection.device == device, f"projection on {projection.device}, tensors on {device}"


def _check_means(means, num_blocks, hkv, head_size, device):
    if means is None:
        return
    assert means.shape == (num_blocks, hkv, head_size) and means.dtype == torch.float32, \
        f"means must be fp32 [{num_blocks}, {hkv}, {head_size}]; got {means.dtype} {tuple(means.shape)}"
    assert means.device == device, f"means on {means.device}, tensors on {device}"


def radar_summarize_pages(kv_cache: torch.Tensor, blocks: torch.Tensor, projection: torch.Tensor, scale: float,
                          summaries: torch.Tensor, page_max: torch.Tensor, *, means: torch.Tensor | None = None,
                          block_f: int | None = None, heads_per_program: int | None = None) -> None:
    """Write the summaries of the full pages `blocks` in place (module docstring, entry point 1).

    Args:
        kv_cache: [num_blocks, Hkv, block_size, 2*D] fp16 / bf16 / fp32, any strides; keys are [..., :D].
        blocks: [M] int32 / int64 physical block ids; entries < 0 are skipped; duplicates allowed.
        projection: [D, n] fp32.  scale: the attention softmax scale.
        summaries: [num_blocks, Hkv, 2n] fp32, written at `blocks` (any strides).
        page_max: [num_blocks, Hkv] fp32, written at `blocks` (any strides).
        means: None (paper's estimator) or [num_blocks, Hkv, D] fp32 (any strides): summarise the
            keys centred on their page mean and write the mean here at `blocks`.
        block_f: features per tile (default min(next_pow2(n), 32) on CUDA, next_pow2(n) elsewhere).
        heads_per_program: KV heads per program (power of two; default 32 rows of head x token on
            CUDA, 64 elsewhere).
    """
    assert kv_cache.dim() == 4 and kv_cache.shape[3] % 2 == 0, "kv_cache [num_blocks, Hkv, block_size, 2D]"
    num_blocks, hkv, page_size, two_d = kv_cache.shape
    d = two_d // 2
    assert kv_cache.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {kv_cache.dtype}"
    assert blocks.dim() == 1 and blocks.dtype in (torch.int32, torch.int64), "blocks must be int32/int64 [M]"
    _check_projection(projection, d, kv_cache.device)
    n = projection.shape[1]
    assert summaries.shape == (num_blocks, hkv, 2 * n) and summaries.dtype == torch.float32, \
        f"summaries must be fp32 [{num_blocks}, {hkv}, {2 * n}]; got {summaries.dtype} {tuple(summaries.shape)}"
    assert page_max.shape == (num_blocks, hkv) and page_max.dtype == torch.float32, "page_max fp32 [num_blocks, Hkv]"
    _check_means(means, num_blocks, hkv, d, kv_cache.device)
    # GPU: 32 rows x 32 features compile without spills for D <= 256 (sm_90); the interpreter
    # pays per op, not per element, so there the tiles are as large as possible
    block_f = block_f or (min(_pow2(n), 32) if kv_cache.is_cuda else _pow2(n))
    assert block_f >= 16 and block_f & (block_f - 1) == 0, "block_f must be a power of two >= 16"
    if blocks.numel() == 0:
        return
    block_t = _pow2(page_size, 1)
    heads = heads_per_program or min(_pow2(hkv, 1), max(1, (32 if kv_cache.is_cuda else 64) // block_t))
    heads = max(heads, triton.cdiv(16, block_t))  # tl.dot needs >= 16 rows
    assert heads & (heads - 1) == 0, "heads_per_program must be a power of two"
    _summarize_kernel[(blocks.shape[0], triton.cdiv(hkv, heads))](
        kv_cache, blocks, projection, summaries, page_max, summaries if means is None else means, hkv,
        math.sqrt(scale), *kv_cache.stride(), blocks.stride(0), *projection.stride(), *summaries.stride(),
        *page_max.stride(), *((0, 0, 0) if means is None else means.stride()), HAS_MEANS=means is not None,
        HEAD_DIM=d, BLOCK_D=_pow2(d), PAGE_SIZE=page_size, BLOCK_T=block_t, HEADS=heads,
        PROJ_DIM=n, BLOCK_F=block_f, num_warps=8,
    )


def radar_page_scores(query: torch.Tensor, summaries: torch.Tensor, page_max: torch.Tensor,
                      block_table: torch.Tensor, num_pages: torch.Tensor, projection: torch.Tensor, scale: float,
                      *, max_pages: int | None = None, means: torch.Tensor | None = None,
                      num_splits: int | None = None, block_p: int | None = None) -> torch.Tensor:
    """Estimated attention share of each candidate page, summed over the group (entry point 2).

    Args:
        query: [N, Hq, D] fp16 / bf16 / fp32, any strides.
        summaries, page_max: [num_blocks, Hkv, 2n] / [num_blocks, Hkv] fp32 (`radar_summarize_pages`).
        block_table: [N, >= P] int32 / int64 physical block of each logical page.
        num_pages: [N] int32 / int64 candidate pages per row (pages p < num_pages[i]).
        projection: [D, n] fp32.  scale: the attention softmax scale.
        max_pages: P, the width of the result; default int(num_pages.max()) (a host sync).
            Must be >= max(num_pages) (not checked); rows are cut at P otherwise.
        means: None (paper's estimator) or [num_blocks, Hkv, D] fp32 page mean keys (from
            `radar_summarize_pages(..., means=)`): adds scale * q . means[b, h] to the logits.
        num_splits: programs per (row, KV head); default ~2 waves on CUDA, 1 elsewhere.
        block_p: pages per tile (power of two >= 16); default from n.

    Returns:
        shares [N, Hkv, P] fp32 (0 for p >= num_pages[i]).
    """
    assert query.dim() == 3 and summaries.dim() == 3, "query [N, Hq, D], summaries [num_blocks, Hkv, 2n]"
    n_rows, hq, d = query.shape
    num_blocks, hkv, feats = summaries.shape
    assert hq % hkv == 0, f"Hq={hq} is not a multiple of Hkv={hkv}"
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {query.dtype}"
    _check_projection(projection, d, query.device)
    n = projection.shape[1]
    assert feats == 2 * n and summaries.dtype == torch.float32, f"summaries must be fp32 [.., .., {2 * n}]"
    assert page_max.shape == (num_blocks, hkv) and page_max.dtype == torch.float32, "page_max fp32 [num_blocks, Hkv]"
    assert block_table.dim() == 2 and block_table.shape[0] == n_rows and \
        block_table.dtype in (torch.int32, torch.int64), "block_table int32/int64 [N, max_pages]"
    assert num_pages.shape == (n_rows,) and num_pages.dtype in (torch.int32, torch.int64), "num_pages int [N]"
    _check_means(means, num_blocks, hkv, d, query.device)
    if max_pages is None:
        max_pages = int(num_pages.max()) if n_rows else 0
    assert 0 <= max_pages <= block_table.shape[1], f"max_pages {max_pages} > block_table width {block_table.shape[1]}"
    out = torch.empty((n_rows, hkv, max_pages), dtype=torch.float32, device=query.device)
    if n_rows == 0 or max_pages == 0:
        return out
    group, block_f = hq // hkv, _pow2(n)
    block_p = block_p or max(16, min(64, 4096 // block_f))
    assert block_p >= 16 and block_p & (block_p - 1) == 0, "block_p must be a power of two >= 16"
    n_tiles = triton.cdiv(max_pages, block_p)
    num_splits = num_splits or default_num_splits(query, n_rows * hkv, n_tiles, min_tiles_per_split=4)
    logits = torch.empty((n_rows, hq, max_pages), dtype=torch.float32, device=query.device)
    m_buf = torch.empty((n_rows, hq, num_splits), dtype=torch.float32, device=query.device)
    l_buf = torch.empty_like(m_buf)
    _page_logits_kernel[(n_rows, hkv, num_splits)](
        query, projection, summaries, page_max, block_table, num_pages, logits, m_buf, l_buf,
        summaries if means is None else means, max_pages, num_splits, math.sqrt(scale), scale,
        *query.stride(), *projection.stride(), *summaries.stride(), *page_max.stride(),
        *((0, 0, 0) if means is None else means.stride()), *block_table.stride(), *logits.stride(), *m_buf.stride(),
        HAS_MEANS=means is not None, GROUP=group, GROUP_PAD=_pow2(group), HEAD_DIM=d,
        BLOCK_K=min(_pow2(d), max(16, 8192 // block_f)),
        PROJ_DIM=n, BLOCK_F=block_f, BLOCK_P=block_p, num_warps=8,  # no spills on sm_90 (4 spill, fp32 q)
    )
    shares_block_p = 256
    _page_shares_kernel[(n_rows, hkv, triton.cdiv(max_pages, shares_block_p))](
        logits, m_buf, l_buf, num_pages, out, max_pages, num_splits,
        *logits.stride(), *m_buf.stride(), *out.stride(),
        GROUP=group, GROUP_PAD=_pow2(group, 2), BLOCK_S=_pow2(num_splits, 2), BLOCK_P=shares_block_p, num_warps=4,
    )
    return out


# --- pure-torch references: the math of `vllm_sparse.policies.radar.RadarPolicy`, op for op ---

def _log_features_ref(x: torch.Tensor, projection: torch.Tensor, scale: float) -> torch.Tensor:
    x = x.float() * math.sqrt(scale)
    proj = x @ projection
    half_norm = (x * x).sum(-1, keepdim=True) / 2
    return torch.cat([proj - half_norm, -proj - half_norm], dim=-1)


def radar_summarize_pages_ref(kv_cache, blocks, projection, scale, summaries, page_max, *, means=None, **_) -> None:
    """`RadarPolicy.observe_write` on the given blocks (same arguments as `radar_summarize_pages`)."""
    blocks = blocks[blocks >= 0].long().unique()
    if blocks.numel() == 0:
        return
    keys = kv_cache[blocks, :, :, : kv_cache.shape[3] // 2]
    if means is not None:
        keys = keys.float()
        means[blocks] = keys.mean(dim=2)
        keys = keys - means[blocks][:, :, None]
    feats = _log_features_ref(keys, projection, scale)
    pmax = feats.amax(dim=(2, 3))
    summaries[blocks] = torch.exp(feats - pmax[..., None, None]).sum(dim=2)
    page_max[blocks] = pmax


def radar_page_scores_ref(query, summaries, page_max, block_table, num_pages, projection, scale, *,
                          max_pages=None, means=None, **_) -> torch.Tensor:
    """`RadarPolicy.page_scores` (same arguments as `radar_page_scores`)."""
    num_rows, num_heads, _ = query.shape
    if max_pages is None:
        max_pages = int(num_pages.max())
    blocks = block_table[:, :max_pages].long()
    summ = summaries[blocks].transpose(1, 2)  # [N, Hkv, P, F]
    pmax = page_max[blocks].transpose(1, 2)  # [N, Hkv, P]
    num_kv_heads = summ.shape[1]
    q_feats = _log_features_ref(query, projection, scale)
    q_feats = torch.exp(q_feats - q_feats.amax(-1, keepdim=True))
    q_feats = q_feats.view(num_rows, num_kv_heads, num_heads // num_kv_heads, -1)
    logits = torch.einsum("nhgf,nhpf->nhgp", q_feats, summ).log() + pmax[:, :, None]
    if means is not None:
        mu = means[blocks].transpose(1, 2)  # [N, Hkv, P, D]
        q = query.float().reshape(num_rows, num_kv_heads, num_heads // num_kv_heads, -1)
        logits = logits + scale * torch.einsum("nhgd,nhpd->nhgp", q, mu)
    valid = torch.arange(max_pages, device=logits.device) < num_pages[:, None]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    shares = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return shares.sum(dim=2)
