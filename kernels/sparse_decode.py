# SPDX-License-Identifier: Apache-2.0
"""Sparse paged decode attention (Triton).

One query token per sequence (decode) attends to a *subset* of its context,
read from vLLM's paged KV cache through the block table.

Shapes (N sequences, Hq query heads, Hkv KV heads, D head size):

* ``query``       [N, Hq, D]                          fp16 / bf16 / fp32
* ``kv_cache``    [num_blocks, Hkv, block_size, 2*D]  same dtype as query; keys
  are ``kv_cache[..., :D]``, values ``kv_cache[..., D:]``. Any strides.
* ``block_table`` [N, max_pages] int32: token ``t`` of sequence ``i`` lives in
  physical block ``block_table[i, t // block_size]`` at offset
  ``t % block_size``.
* ``seq_lens``    [N] int32: context length ``T_i`` *including* the current
  token (its K/V is already in the cache).
* ``selected``    [N, Hkv, S] int32, padded with -1: logical page indices
  (``mode="page"``) or logical token positions (``mode="token"``). Entries are
  unique per row apart from the -1 padding, in any order.

Query head ``h`` uses KV head ``h // (Hq // Hkv)`` (GQA, any group size).

For sequence ``i`` and KV head ``g`` the attended set is the union (each token
at most once) of

* sinks:    ``{t : t < min(num_sink_tokens, T_i)}``
* window:   ``{t : T_i - local_window <= t < T_i}``
* selected: page mode ``{t < T_i : t // block_size in selected[i, g]}``,
  token mode ``{t in selected[i, g] : 0 <= t < T_i}``.

Selected entries at or beyond the context are ignored. The output is the exact
softmax attention (scores ``scale * q.k``) over that set, accumulated in fp32
and written in the query's dtype; the optional log-sum-exp [N, Hq] (fp32,
natural log of the scaled scores) can be returned as well. An empty attended
set (e.g. ``T_i == 0``) gives a zero output and ``lse = -inf``.

Implementation: grid ``(N, Hkv, num_splits)``. Each program handles all query
heads of one KV-head group (padded to a power of two >= 16, so the group's
queries share every K/V tile in one ``tl.dot``) and walks its contiguous share
of a per-(sequence, KV head) work list of ``BLOCK_N``-token tiles: sink tiles,
then selected tiles (selected tokens already covered by sinks or window are
masked out, which dedupes the union), then window tiles. Each program keeps an
online softmax and writes a normalised partial output and its LSE; a small
merge kernel combines the splits (flash-decoding). Splits without work write
neutral partials (``lse = -inf``) that the merge ignores. With a single split
the main kernel writes the final output directly.
"""

import math

import torch
import triton
import triton.language as tl

from .split_merge import default_num_splits, merge_splits

_LOG2E = 1.4426950408889634
_MODES = ("page", "token")


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc,  # running state: [GP, BD], [GP], [GP], [GP, BD]
    tok, valid,  # [BLOCK_N] logical token positions and their mask
    kv_head_ptr,  # kv_cache base already offset to this KV head
    bt_row_ptr,  # block_table row of this sequence
    offs_d, d_mask, qk_scale,
    stride_bt_page, stride_kv_block, stride_kv_tok, stride_kv_dim,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) with one tile of tokens."""
    tok = tl.where(valid, tok, 0)
    block = tl.load(bt_row_ptr + (tok // PAGE_SIZE) * stride_bt_page, mask=valid, other=0)
    row = block.to(tl.int64) * stride_kv_block + (tok % PAGE_SIZE).to(tl.int64) * stride_kv_tok
    k_ptrs = kv_head_ptr + row[:, None] + offs_d[None, :] * stride_kv_dim
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BD]
    v = tl.load(k_ptrs + HEAD_DIM * stride_kv_dim, mask=kv_mask, other=0.0)  # [BLOCK_N, BD]

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GP, BLOCK_N], log2 units
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked rows: avoid inf - inf
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _sparse_decode_kernel(
    q_ptr,  # [N, Hq, D]
    kv_ptr,  # [num_blocks, Hkv, PAGE_SIZE, 2*D]
    bt_ptr,  # [N, max_pages] int32
    seq_lens_ptr,  # [N] int32
    sel_ptr,  # [N, Hkv, S] int32, -1 padded
    o_ptr,  # [N, Hq, NUM_SPLITS, D] fp32 partials (or the final out when NUM_SPLITS == 1)
    lse_ptr,  # [N, Hq, NUM_SPLITS] fp32
    sinks_ptr,  # [N] int32: always-attended prefix of each row
    window_ptr,  # [N] int32: always-attended suffix of each row
    num_sel,  # S
    qk_scale,  # softmax scale * log2(e)
    stride_q_seq, stride_q_head, stride_q_dim,
    stride_kv_block, stride_kv_head, stride_kv_tok, stride_kv_dim,
    stride_bt_seq, stride_bt_page,
    stride_sel_seq, stride_sel_head, stride_sel_item,
    stride_o_seq, stride_o_head, stride_o_split, stride_o_dim,
    stride_lse_seq, stride_lse_head, stride_lse_split,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    PAGE_SIZE: tl.constexpr,  # cache block size
    BLOCK_N: tl.constexpr,  # tokens per tile
    NUM_SPLITS: tl.constexpr,
    PAGE_MODE: tl.constexpr,  # True: selected holds pages, False: tokens
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    T = tl.load(seq_lens_ptr + seq)
    n_sink = tl.minimum(tl.load(sinks_ptr + seq), T)
    win_start = tl.maximum(T - tl.load(window_ptr + seq), n_sink)  # window = [win_start, T), disjoint from sinks

    # Work list of BLOCK_N-token tiles: sinks, selected, window; this split takes a contiguous share.
    if PAGE_MODE:
        sel_len = num_sel * PAGE_SIZE
    else:
        sel_len = num_sel
    n_sink_tiles = tl.cdiv(n_sink, BLOCK_N)
    n_sel_tiles = tl.cdiv(sel_len, BLOCK_N)
    n_win_tiles = tl.cdiv(T - win_start, BLOCK_N)
    sel_end = n_sink_tiles + n_sel_tiles
    total = sel_end + n_win_tiles
    per_split = tl.cdiv(total, NUM_SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, total)

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
    sel_row_ptr = sel_ptr + seq * stride_sel_seq + kvh * stride_sel_head

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)

    # 1) sink tokens [0, n_sink)
    for k in range(lo, tl.minimum(hi, n_sink_tiles)):
        tok = k * BLOCK_N + offs_n
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, tok, tok < n_sink, kv_head_ptr, bt_row_ptr, offs_d, d_mask, qk_scale,
            stride_bt_page, stride_kv_block, stride_kv_tok, stride_kv_dim,
            HEAD_DIM, PAGE_SIZE, DOT_PRECISION)

    # 2) selected pages / tokens, keeping only those in [n_sink, win_start) (dedupe)
    for k in range(tl.maximum(lo, n_sink_tiles), tl.minimum(hi, sel_end)):
        f = (k - n_sink_tiles) * BLOCK_N + offs_n  # flat index into the selected list
        if PAGE_MODE:
            idx = f // PAGE_SIZE
            page = tl.load(sel_row_ptr + idx * stride_sel_item, mask=idx < num_sel, other=-1)
            page_ok = (page >= 0) & (page < tl.cdiv(win_start, PAGE_SIZE))
            tok = tl.where(page_ok, page, 0) * PAGE_SIZE + f % PAGE_SIZE
            valid = page_ok & (tok >= n_sink) & (tok < win_start)
        else:
            tok = tl.load(sel_row_ptr + f * stride_sel_item, mask=f < num_sel, other=-1)
            valid = (tok >= 0) & (tok >= n_sink) & (tok < win_start)
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, tok, valid, kv_head_ptr, bt_row_ptr, offs_d, d_mask, qk_scale,
            stride_bt_page, stride_kv_block, stride_kv_tok, stride_kv_dim,
            HEAD_DIM, PAGE_SIZE, DOT_PRECISION)

    # 3) local window [win_start, T)
    for k in range(tl.maximum(lo, sel_end), hi):
        tok = win_start + (k - sel_end) * BLOCK_N + offs_n
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, tok, tok < T, kv_head_ptr, bt_row_ptr, offs_d, d_mask, qk_scale,
            stride_bt_page, stride_kv_block, stride_kv_tok, stride_kv_dim,
            HEAD_DIM, PAGE_SIZE, DOT_PRECISION)

    # Normalised partial output and its natural-log LSE; empty splits give (0, -inf).
    has_work = l_i > 0.0
    l_safe = tl.where(has_work, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has_work, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = (o_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + split * stride_o_split
              + offs_d[None, :] * stride_o_dim)
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    lse_ptrs = lse_ptr + seq * stride_lse_seq + heads * stride_lse_head + split * stride_lse_split
    tl.store(lse_ptrs, lse, mask=g_mask)


def _per_row(value, n: int, device) -> torch.Tensor:
    """Sink/window sizes as an [N] int32 tensor (an int applies to every row)."""
    if isinstance(value, torch.Tensor):
        assert value.shape == (n,), f"per-row sizes must be [N={n}], got {tuple(value.shape)}"
        return value.to(device=device, dtype=torch.int32)
    assert value >= 0, f"sizes must be >= 0, got {value}"
    return torch.full((n,), value, dtype=torch.int32, device=device)


def _upper_bound(value) -> int:
    """Largest size: the int itself, or a per-row tensor's max (one host sync)."""
    if isinstance(value, torch.Tensor):
        return int(value.max()) if value.numel() else 0
    return int(value)


def _check_args(query, kv_cache, block_table, seq_lens, selected, mode):
    assert mode in _MODES, f"mode must be one of {_MODES}, got {mode!r}"
    assert query.dim() == 3 and kv_cache.dim() == 4, "query [N, Hq, D], kv_cache [blocks, Hkv, bs, 2D]"
    n, hq, d = query.shape
    hkv = kv_cache.shape[1]
    assert kv_cache.shape[3] == 2 * d, f"kv_cache last dim {kv_cache.shape[3]} != 2 * head size {d}"
    assert hq % hkv == 0, f"Hq={hq} is not a multiple of Hkv={hkv}"
    assert block_table.dim() == 2 and block_table.shape[0] == n and block_table.dtype == torch.int32
    assert seq_lens.shape == (n,) and seq_lens.dtype == torch.int32
    assert selected.dim() == 3 and selected.shape[:2] == (n, hkv) and selected.dtype == torch.int32, \
        f"selected must be int32 [N, Hkv, S]; got {selected.dtype} {tuple(selected.shape)}"


def sparse_paged_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    mode: str = "page",
    num_sink_tokens: int | torch.Tensor = 0,
    local_window: int | torch.Tensor = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    *,
    num_splits: int | None = None,
    block_n: int = 64,
):
    """Sparse paged decode attention (see the module docstring for the semantics).

    Args:
        query: [N, Hq, D] fp16 / bf16 / fp32.
        kv_cache: [num_blocks, Hkv, block_size, 2*D], same dtype as query, any strides.
        block_table: [N, max_pages] int32.
        seq_lens: [N] int32, context length including the current token.
        selected: [N, Hkv, S] int32, -1 padded; pages (mode="page") or tokens (mode="token").
        mode: "page" or "token".
        num_sink_tokens, local_window: always-attended prefix / suffix sizes (>= 0), for
            all rows (int) or per row ([N] int tensor).
        scale: softmax scale, default D ** -0.5.
        out: optional [N, Hq, D] output in query's dtype.
        return_lse: also return the log-sum-exp [N, Hq] fp32.
        num_splits: programs per (sequence, KV head) (flash-decoding); default from the shapes.
        block_n: tokens per tile (power of two >= 16).

    Returns:
        out [N, Hq, D], or (out, lse [N, Hq] fp32) when return_lse.
    """
    _check_args(query, kv_cache, block_table, seq_lens, selected, mode)
    n, hq, d = query.shape
    _, hkv, page_size, _ = kv_cache.shape
    assert kv_cache.dtype == query.dtype, f"kv_cache dtype {kv_cache.dtype} != query dtype {query.dtype}"
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {query.dtype}"
    sinks = _per_row(num_sink_tokens, n, query.device)
    window = _per_row(local_window, n, query.device)
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "block_n must be a power of two >= 16"
    group = hq // hkv
    num_sel = selected.shape[2]
    if scale is None:
        scale = d ** -0.5
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype, "out must match query's shape and dtype"
    lse = torch.empty((n, hq), dtype=torch.float32, device=query.device)
    if n == 0:
        return (out, lse) if return_lse else out

    sel_tokens = num_sel * page_size if mode == "page" else num_sel
    max_work = min(_upper_bound(num_sink_tokens) + _upper_bound(local_window) + sel_tokens,
                   block_table.shape[1] * page_size)
    if num_splits is None:
        num_splits = default_num_splits(query, n * hkv, triton.cdiv(max_work, block_n))
    assert num_splits >= 1

    if num_splits == 1:  # write the final result directly
        o_buf, lse_buf = out, lse
        o_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        o_buf = torch.empty((n, hq, num_splits, d), dtype=torch.float32, device=query.device)
        lse_buf = torch.empty((n, hq, num_splits), dtype=torch.float32, device=query.device)
        o_strides, lse_strides = o_buf.stride(), lse_buf.stride()

    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    _sparse_decode_kernel[(n, hkv, num_splits)](
        query, kv_cache, block_table, seq_lens, selected, o_buf, lse_buf,
        sinks, window, num_sel, scale * _LOG2E,
        *query.stride(), *kv_cache.stride(), *block_table.stride(), *selected.stride(),
        *o_strides, *lse_strides,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        PAGE_MODE=mode == "page",
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    if num_splits > 1:
        merge_splits(o_buf, lse_buf, out, lse, log2_units=False)
    return (out, lse) if return_lse else out


def sparse_paged_decode_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    mode: str = "page",
    num_sink_tokens: int = 0,
    local_window: int = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    *,
    num_splits: int | None = None,
    block_n: int = 64,
):
    """Pure-torch reference (float64 softmax), same arguments as ``sparse_paged_decode``.

    ``return_lse``, ``num_splits`` and ``block_n`` are accepted for symmetry and ignored.

    Returns:
        (out [N, Hq, D] in query's dtype, lse [N, Hq] fp32, num_attended [N, Hkv] int64).
    """
    _check_args(query, kv_cache, block_table, seq_lens, selected, mode)
    n, hq, d = query.shape
    _, hkv, page_size, _ = kv_cache.shape
    group = hq // hkv
    if scale is None:
        scale = d ** -0.5
    dev = query.device
    sinks = _per_row(num_sink_tokens, n, dev).tolist()
    window = _per_row(local_window, n, dev).tolist()
    o64 = torch.zeros((n, hq, d), dtype=torch.float64, device=dev)
    lse = torch.full((n, hq), -math.inf, dtype=torch.float64, device=dev)
    num_attended = torch.zeros((n, hkv), dtype=torch.int64, device=dev)
    for i in range(n):
        t_len = int(seq_lens[i])
        if t_len <= 0:
            continue
        pos = torch.arange(t_len, device=dev)
        blocks = block_table[i, pos // page_size].long()
        kv = kv_cache[blocks, :, pos % page_size].to(torch.float64)  # [T, Hkv, 2D]
        for g in range(hkv):
            mask = torch.zeros(t_len, dtype=torch.bool, device=dev)
            mask[: min(sinks[i], t_len)] = True
            mask[max(t_len - window[i], 0):] = True
            sel = selected[i, g].long()
            sel = sel[sel >= 0]
            if mode == "page":
                sel = sel[sel * page_size < t_len]
                tok = (sel[:, None] * page_size + torch.arange(page_size, device=dev)).flatten()
            else:
                tok = sel
            mask[tok[tok < t_len]] = True
            num_attended[i, g] = mask.sum()
            if not bool(mask.any()):
                continue
            heads = slice(g * group, (g + 1) * group)
            k, v = kv[mask, g, :d], kv[mask, g, d:]
            s = (query[i, heads].to(torch.float64) @ k.T) * scale  # [G, n_att]
            lse_ig = torch.logsumexp(s, dim=-1)
            o64[i, heads] = torch.exp(s - lse_ig[:, None]) @ v
            lse[i, heads] = lse_ig
    if out is None:
        out = torch.empty_like(query)
    out.copy_(o64.to(query.dtype))
    return out, lse.to(torch.float32), num_attended
