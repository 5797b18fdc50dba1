# SPDX-License-Identifier: Apache-2.0
"""Dense paged decode attention that also returns per-token attention scores (Triton).

Recycled Attention / RefreshKV refreshes its small per-head cache on a "full step":
the current query attends to the *whole* context and the attention weights of every
context token, max-reduced over the query heads of each KV group, rank the tokens.
FlashAttention-style kernels do not return those weights; this one does.

Shapes (N sequences, Hq query heads, Hkv KV heads, D head size, L score width):

* ``query``       [N, Hq, D]                          fp16 / bf16 / fp32
* ``kv_cache``    [num_blocks, Hkv, block_size, 2*D]  same dtype as query; keys
  are ``kv_cache[..., :D]``, values ``kv_cache[..., D:]``. Any strides.
* ``block_table`` [N, max_pages] int32: token ``t`` of sequence ``i`` lives in
  physical block ``block_table[i, t // block_size]`` at offset ``t % block_size``.
* ``seq_lens``    [N] int32: context length ``T_i`` *including* the current token.

Query head ``h`` uses KV head ``h // (Hq // Hkv)`` (GQA, any group size). Outputs:

* ``out``    [N, Hq, D] in the query's dtype: exact softmax attention (scores
  ``scale * q.k``) over all ``T_i`` tokens, accumulated in fp32.
* ``scores`` [N, Hkv, L] fp32: ``scores[i, g, t] = max_{h in group g} p[i, h, t]``
  where ``p[i, h, :T_i]`` is the normalised attention weight (softmax) of head ``h``.
  Entries with ``t >= T_i`` are **0** (so ``scores[i, g].sum()`` is 1 for a group
  of one head and in ``[1, group]`` otherwise). ``L`` defaults to
  ``max_pages * block_size`` (shape-only, no host sync); with ``max_seq_len=L``
  smaller than some ``T_i`` the tokens at ``t >= L`` are still attended but get
  no score. ``T_i == 0`` gives a zero output and zero scores.

Implementation, three launches:

1. ``_decode_logits_kernel``, grid ``(N, Hkv, num_splits)``: each program takes all
   query heads of one KV group (padded to a power of two >= 16, so they share every
   K/V tile in one ``tl.dot``) over a contiguous share of the ``BLOCK_N``-token tiles
   of ``[0, T_i)`` (flash-decoding), keeps an online softmax, writes a normalised
   partial output and its LSE, and stores the raw logits ``scale*log2(e)*q.k`` of
   every token into an fp32 scratch [N, Hq, L]. Storing logits (Hq*4 bytes per
   token) is far cheaper than re-reading K in a second pass (Hkv*D*2 bytes).
2. ``split_merge.merge_splits``, grid ``(N, Hq)`` (only when ``num_splits > 1``):
   combines the partials into ``out`` and the per-head LSE.
3. ``_scores_kernel``, grid ``(N, Hkv, cdiv(L, BLOCK_T))``:
   ``scores = max_h exp2(logit_h - lse_h)``, zero beyond ``T_i``.
"""


import torch
import triton
import triton.language as tl

from .split_merge import default_num_splits, merge_splits

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_logits_kernel(
    q_ptr,  # [N, Hq, D]
    kv_ptr,  # [num_blocks, Hkv, PAGE_SIZE, 2*D]
    bt_ptr,  # [N, max_pages] int32
    seq_lens_ptr,  # [N] int32
    o_ptr,  # [N, Hq, NUM_SPLITS, D] fp32 partials (or the final out when NUM_SPLITS == 1)
    lse_ptr,  # [N, Hq, NUM_SPLITS] fp32, log2 units
    logits_ptr,  # [N, Hq, L] fp32 scratch, log2 units
    max_len,  # L
    qk_scale,  # softmax scale * log2(e)
    stride_q_seq, stride_q_head, stride_q_dim,
    stride_kv_block, stride_kv_head, stride_kv_tok, stride_kv_dim,
    stride_bt_seq, stride_bt_page,
    stride_o_seq, stride_o_head, stride_o_split, stride_o_dim,
    stride_lse_seq, stride_lse_head, stride_lse_split,
    stride_lg_seq, stride_lg_head, stride_lg_tok,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    PAGE_SIZE: tl.constexpr,  # cache block size
    BLOCK_N: tl.constexpr,  # tokens per tile
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    T = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(T, BLOCK_N), NUM_SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, tl.cdiv(T, BLOCK_N))

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g

    q_ptrs = q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :] * stride_q_dim
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [GROUP_PAD, BLOCK_D]
    kv_head_ptr = kv_ptr + kvh * stride_kv_head
    bt_row_ptr = bt_ptr + seq * stride_bt_seq
    lg_ptrs = logits_ptr + seq * stride_lg_seq + heads[:, None] * stride_lg_head

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for k in range(lo, hi):
        tok = k * BLOCK_N + offs_n
        valid = tok < T
        block = tl.load(bt_row_ptr + (tok // PAGE_SIZE) * stride_bt_page, mask=valid, other=0)
        row = block.to(tl.int64) * stride_kv_block + (tok % PAGE_SIZE).to(tl.int64) * stride_kv_tok
        k_ptrs = kv_head_ptr + row[:, None] + offs_d[None, :] * stride_kv_dim
        kv_mask = valid[:, None] & d_mask[None, :]
        kt = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(k_ptrs + HEAD_DIM * stride_kv_dim, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        tl.store(lg_ptrs + tok[None, :] * stride_lg_tok, s, mask=g_mask[:, None] & (valid & (tok < max_len))[None, :])
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Normalised partial output and its log2 LSE; empty splits give (0, -inf).
    has_work = l_i > 0.0
    l_safe = tl.where(has_work, l_i, 1.0)
    lse = tl.where(has_work, m_i + tl.log2(l_safe), float("-inf"))
    o_ptrs = (o_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + split * stride_o_split
              + offs_d[None, :] * stride_o_dim)
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + seq * stride_lse_seq + heads * stride_lse_head + split * stride_lse_split, lse, mask=g_mask)


@triton.jit
def _scores_kernel(
    logits_ptr,  # [N, Hq, L] fp32, log2 units
    lse_ptr,  # [N, Hq] fp32, log2 units
    seq_lens_ptr,  # [N] int32
    scores_ptr,  # [N, Hkv, L] fp32
    max_len,  # L
    stride_lg_seq, stride_lg_head, stride_lg_tok,
    stride_lse_seq, stride_lse_head,
    stride_sc_seq, stride_sc_head, stride_sc_tok,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two >= 2
    BLOCK_T: tl.constexpr,  # tokens per program
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    tok = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, GROUP_PAD)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g

    T = tl.load(seq_lens_ptr + seq)
    valid = tok < T
    lse = tl.load(lse_ptr + seq * stride_lse_seq + heads * stride_lse_head, mask=g_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # T == 0: nothing valid below anyway
    s = tl.load(logits_ptr + seq * stride_lg_seq + heads[:, None] * stride_lg_head + tok[None, :] * stride_lg_tok,
                mask=g_mask[:, None] & valid[None, :], other=float("-inf"))
    p = tl.max(tl.exp2(s - lse[:, None]), 0)  # [BLOCK_T]; 0 beyond T and for padded heads
    tl.store(scores_ptr + seq * stride_sc_seq + kvh * stride_sc_head + tok * stride_sc_tok, p, mask=tok < max_len)


def _check_args(query, kv_cache, block_table, seq_lens):
    assert query.dim() == 3 and kv_cache.dim() == 4, "query [N, Hq, D], kv_cache [blocks, Hkv, bs, 2D]"
    n, hq, d = query.shape
    hkv = kv_cache.shape[1]
    assert kv_cache.shape[3] == 2 * d, f"kv_cache last dim {kv_cache.shape[3]} != 2 * head size {d}"
    assert hq % hkv == 0, f"Hq={hq} is not a multiple of Hkv={hkv}"
    assert block_table.dim() == 2 and block_table.shape[0] == n and block_table.dtype == torch.int32
    assert seq_lens.shape == (n,) and seq_lens.dtype == torch.int32


def decode_with_scores(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    scores_out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
):
    """Dense paged decode attention plus per-token scores (see the module docstring).

    Args:
        query: [N, Hq, D] fp16 / bf16 / fp32.
        kv_cache: [num_blocks, Hkv, block_size, 2*D], same dtype as query, any strides.
        block_table: [N, max_pages] int32.
        seq_lens: [N] int32, context length including the current token.
        scale: softmax scale, default D ** -0.5.
        out: optional [N, Hq, D] output in query's dtype (any strides).
        scores_out: optional [N, Hkv, L] fp32 scores buffer (any strides); sets L.
        max_seq_len: score width L when scores_out is None; default max_pages * block_size.
        num_splits: programs per (sequence, KV head) (flash-decoding); default from the shapes.
        block_n: tokens per tile (power of two >= 16).

    Returns:
        (out [N, Hq, D], scores [N, Hkv, L] fp32, 0 at t >= seq_lens[i]).
    """
    _check_args(query, kv_cache, block_table, seq_lens)
    n, hq, d = query.shape
    _, hkv, page_size, _ = kv_cache.shape
    assert kv_cache.dtype == query.dtype, f"kv_cache dtype {kv_cache.dtype} != query dtype {query.dtype}"
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {query.dtype}"
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "block_n must be a power of two >= 16"
    group, dev = hq // hkv, query.device
    scale = d ** -0.5 if scale is None else scale
    if scores_out is None:
        max_len = block_table.shape[1] * page_size if max_seq_len is None else max_seq_len
        scores_out = torch.empty((n, hkv, max_len), dtype=torch.float32, device=dev)
    max_len = scores_out.shape[2]
    assert scores_out.shape[:2] == (n, hkv) and scores_out.dtype == torch.float32, "scores_out: fp32 [N, Hkv, L]"
    out = torch.empty_like(query) if out is None else out
    assert out.shape == query.shape and out.dtype == query.dtype, "out must match query's shape and dtype"
    if n == 0:
        return out, scores_out
    if num_splits is None:
        num_splits = default_num_splits(query, n * hkv, triton.cdiv(block_table.shape[1] * page_size, block_n))
    assert num_splits >= 1

    lse = torch.empty((n, hq), dtype=torch.float32, device=dev)
    logits = torch.empty((n, hq, max_len), dtype=torch.float32, device=dev)
    if num_splits == 1:  # write the final result directly
        o_buf, lse_buf = out, lse
        o_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        o_buf = torch.empty((n, hq, num_splits, d), dtype=torch.float32, device=dev)
        lse_buf = torch.empty((n, hq, num_splits), dtype=torch.float32, device=dev)
        o_strides, lse_strides = o_buf.stride(), lse_buf.stride()

    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    _decode_logits_kernel[(n, hkv, num_splits)](
        query, kv_cache, block_table, seq_lens, o_buf, lse_buf, logits, max_len, scale * _LOG2E,
        *query.stride(), *kv_cache.stride(), *block_table.stride(), *o_strides, *lse_strides, *logits.stride(),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    if num_splits > 1:
        merge_splits(o_buf, lse_buf, out, lse, log2_units=True)
    group_pad = max(2, triton.next_power_of_2(group))  # avoid size-1 tensor dims
    block_t = max(128, 4096 // group_pad)
    if max_len > 0:
        _scores_kernel[(n, hkv, triton.cdiv(max_len, block_t))](
            logits, lse, seq_lens, scores_out, max_len,
            *logits.stride(), *lse.stride(), *scores_out.stride(),
            GROUP=group, GROUP_PAD=group_pad, BLOCK_T=block_t,
            num_warps=4,
        )
    return out, scores_out


def decode_with_scores_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    scores_out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
):
    """Pure-torch reference (float64 softmax), same arguments as ``decode_with_scores``.

    ``num_splits`` and ``block_n`` are accepted for symmetry and ignored.

    Returns:
        (out [N, Hq, D] in query's dtype, scores [N, Hkv, L] fp32, 0 at t >= seq_lens[i]).
    """
    _check_args(query, kv_cache, block_table, seq_lens)
    n, hq, d = query.shape
    _, hkv, page_size, _ = kv_cache.shape
    group, dev = hq // hkv, query.device
    scale = d ** -0.5 if scale is None else scale
    if scores_out is None:
        max_len = block_table.shape[1] * page_size if max_seq_len is None else max_seq_len
        scores_out = torch.empty((n, hkv, max_len), dtype=torch.float32, device=dev)
    max_len = scores_out.shape[2]
    o64 = torch.zeros((n, hq, d), dtype=torch.float64, device=dev)
    s64 = torch.zeros((n, hkv, max_len), dtype=torch.float64, device=dev)
    for i in range(n):
        t_len = int(seq_lens[i])
        if t_len <= 0:
            continue
        pos = torch.arange(t_len, device=dev)
        kv = kv_cache[block_table[i, pos // page_size].long(), :, pos % page_size].to(torch.float64)  # [T, Hkv, 2D]
        q = query[i].to(torch.float64).view(hkv, group, d)
        s = torch.einsum("hgd,thd->hgt", q, kv[..., :d]) * scale  # [Hkv, G, T]
        p = torch.softmax(s, dim=-1)
        o64[i] = torch.einsum("hgt,thd->hgd", p, kv[..., d:]).reshape(hq, d)
        keep = min(t_len, max_len)
        s64[i, :, :keep] = p.amax(dim=1)[:, :keep]
    out = torch.empty_like(query) if out is None else out
    out.copy_(o64.to(query.dtype))
    scores_out.copy_(s64.to(torch.float32))
    return out, scores_out
