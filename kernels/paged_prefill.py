# SPDX-License-Identifier: Apache-2.0
"""Causal paged prefill attention (Triton), flash-attention style.

A batch of B rows (requests) brings new query tokens; each row's K/V, the new tokens
included, is already in vLLM's paged KV cache.

Shapes (T new tokens in all, Hq query heads, Hkv KV heads, D head size):

* ``query``           [T, Hq, D]  fp16 / bf16 / fp32, any strides. Row ``b``'s tokens are
  ``query[query_start_loc[b]:query_start_loc[b + 1]]`` (``q_b`` of them, 0 allowed).
* ``kv_cache``        [num_blocks, Hkv, block_size, 2*D]  same dtype as query, any strides;
  keys ``kv_cache[..., :D]``, values ``kv_cache[..., D:]``.
* ``block_table``     [B, max_pages] int32: token ``t`` of row ``b`` lives in block
  ``block_table[b, t // block_size]`` at offset ``t % block_size``.
* ``query_start_loc`` [B + 1] int32, non-decreasing, ``query_start_loc[B] == T``.
* ``seq_lens``        [B] int32: context length ``L_b >= q_b`` of row ``b`` (new tokens included).

The query tokens of row ``b`` are the *last* ``q_b`` of its ``L_b`` context tokens (plain,
chunked or prefix-cached prefill): query token ``j`` sits at position ``L_b - q_b + j`` and
attends causally to positions ``<= L_b - q_b + j``. Query head ``h`` uses KV head
``h // (Hq // Hkv)`` (GQA, any group size). Scores are ``scale * q.k``; softmax and the
output accumulate in fp32 and are written in the query's dtype.

Implementation: grid ``(T // BLOCK_Q + B, Hkv)``; axis 0 enumerates query tiles of
``BLOCK_Q`` tokens over all rows (row ``b``'s tiles start at ``query_start_loc[b] // BLOCK_Q
+ b``, an upper bound that needs no host sync; a program finds its row by binary search and
exits if its tile is empty) and walks them heaviest-first. Each program packs the ``GROUP``
query heads of one KV head with its ``BLOCK_Q`` tokens into ``BLOCK_M = BLOCK_Q * GROUP``
(padded to a power of two) rows, so a K/V tile is loaded once per group. It streams
``BLOCK_N``-token K/V tiles through the block table with an online softmax: first the tiles
every query of the tile sees in full (no mask), then the few diagonal tiles with the causal
mask.
"""

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc,  # running state: [BM, BD], [BM], [BM], [BM, BD]
    start, q_pos, kv_end,  # first key position of the tile, [BM] query positions, key limit
    k_base, v_base,  # [1, BD] pointers to this KV head's key / value channels (block 0, offset 0)
    bt_row_ptr,  # block_table row of this sequence
    offs_n, d_mask, qk_scale,
    stride_bt_page, stride_kv_block, stride_kv_tok,
    PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAD_D: tl.constexpr,  # BLOCK_D > HEAD_DIM: mask the padded channels
    MASKED: tl.constexpr,  # False: every query of the tile sees every key (no causal / length masks)
):
    """Online-softmax update of (m_i, l_i, acc) with the keys [start, start + BLOCK_N)."""
    k_pos = start + offs_n
    if MASKED:
        valid = k_pos < kv_end
        block = tl.load(bt_row_ptr + (k_pos // PAGE_SIZE) * stride_bt_page, mask=valid, other=0)
    else:
        block = tl.load(bt_row_ptr + (k_pos // PAGE_SIZE) * stride_bt_page)
    row = (block.to(tl.int64) * stride_kv_block + (k_pos % PAGE_SIZE).to(tl.int64) * stride_kv_tok)[:, None]
    if MASKED or PAD_D:
        if MASKED:
            kv_mask = valid[:, None] & d_mask
        else:
            kv_mask = d_mask
        k = tl.load(k_base + row, mask=kv_mask, other=0.0)  # [BLOCK_N, BD]
        v = tl.load(v_base + row, mask=kv_mask, other=0.0)  # [BLOCK_N, BD]
    else:  # interior tile, BD == D: unmasked (vectorised) loads
        k = tl.load(k_base + row)
        v = tl.load(v_base + row)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BLOCK_N], log2 units
    if MASKED:
        # Every row keeps >= 1 key in the first masked tile (start <= its position), so m_i stays finite.
        s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [T, Hq, D]
    kv_ptr,  # [num_blocks, Hkv, PAGE_SIZE, 2*D]
    bt_ptr,  # [B, max_pages] int32
    qsl_ptr,  # [B + 1] int32 query_start_loc
    seq_lens_ptr,  # [B] int32
    o_ptr,  # [T, Hq, D]
    num_rows,  # B
    qk_scale,  # softmax scale * log2(e)
    stride_q_tok: tl.int64, stride_q_head: tl.int64, stride_q_dim,
    stride_kv_block: tl.int64, stride_kv_head: tl.int64, stride_kv_tok: tl.int64, stride_kv_dim,
    stride_bt_row: tl.int64, stride_bt_page,
    stride_o_tok: tl.int64, stride_o_head: tl.int64, stride_o_dim,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    PAGE_SIZE: tl.constexpr,  # cache block size
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x GROUP heads, padded (power of two)
    BLOCK_Q: tl.constexpr,  # query tokens per program, BLOCK_M // GROUP
    BLOCK_N: tl.constexpr,  # keys per tile
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) tiles first
    kvh = tl.program_id(1).to(tl.int64)

    # Row b owns tiles [qsl[b] // BLOCK_Q + b, qsl[b + 1] // BLOCK_Q + b]: find the last b starting <= tile.
    lo: tl.int32 = 0
    hi: tl.int32 = num_rows
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    j0 = (tile - q_start // BLOCK_Q - seq) * BLOCK_Q  # first query token of this tile within the row
    if j0 >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq) - q_len  # tokens before the first new one

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = (offs_d < HEAD_DIM)[None, :]
    j = j0 + offs_m // GROUP
    m_mask = (offs_m < BLOCK_Q * GROUP) & (j < q_len)
    q_pos = ctx + j
    tok = (q_start + j).to(tl.int64)
    head = kvh * GROUP + offs_m % GROUP
    q_ptrs = q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :] * stride_q_dim
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = kv_ptr + kvh * stride_kv_head + offs_d[None, :] * stride_kv_dim
    v_base = k_base + HEAD_DIM * stride_kv_dim
    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt_row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys < ctx + j0 + 1 are visible to every query of the tile: whole tiles of them need no mask.
    kv_end = ctx + tl.minimum(j0 + BLOCK_Q, q_len)
    full_end = (ctx + j0 + 1) // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start, q_pos, kv_end, k_base, v_base, bt_row_ptr, offs_n, d_mask, qk_scale,
            stride_bt_page, stride_kv_block, stride_kv_tok, PAGE_SIZE, DOT_PRECISION, BLOCK_D != HEAD_DIM, False)
    for start in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start, q_pos, kv_end, k_base, v_base, bt_row_ptr, offs_n, d_mask, qk_scale,
            stride_bt_page, stride_kv_block, stride_kv_tok, PAGE_SIZE, DOT_PRECISION, BLOCK_D != HEAD_DIM, True)

    o = acc / l_i[:, None]
    o_ptrs = o_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :] * stride_o_dim
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask)


def _check_args(query, kv_cache, block_table, query_start_loc, seq_lens, out):
    assert query.dim() == 3 and kv_cache.dim() == 4, "query [T, Hq, D], kv_cache [blocks, Hkv, bs, 2D]"
    t, hq, d = query.shape
    hkv = kv_cache.shape[1]
    assert kv_cache.shape[3] == 2 * d, f"kv_cache last dim {kv_cache.shape[3]} != 2 * head size {d}"
    assert hq % hkv == 0, f"Hq={hq} is not a multiple of Hkv={hkv}"
    assert query.dtype in _DTYPES and kv_cache.dtype == query.dtype, \
        f"query/kv_cache dtypes {query.dtype}/{kv_cache.dtype}: must be equal and one of {_DTYPES}"
    b = seq_lens.shape[0]
    assert seq_lens.shape == (b,) and seq_lens.dtype == torch.int32, "seq_lens must be int32 [B]"
    assert query_start_loc.shape == (b + 1,) and query_start_loc.dtype == torch.int32, \
        "query_start_loc must be int32 [B + 1]"
    assert block_table.dim() == 2 and block_table.shape[0] == b and block_table.dtype == torch.int32, \
        "block_table must be int32 [B, max_pages]"
    if out is not None:
        assert out.shape == query.shape and out.dtype == query.dtype, "out must match query's shape and dtype"


def _default_tiles(query):
    """(block_m, block_n, num_warps, num_stages): big tiles for 16-bit D <= 128 on the GPU, smaller
    ones otherwise (fp32 tiles are twice the shared memory; the CPU interpreter pays per element)."""
    if query.is_cuda and query.dtype != torch.float32 and query.shape[2] <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def paged_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal prefill attention over the paged cache (see the module docstring for the semantics).

    Args:
        query: [T, Hq, D] fp16 / bf16 / fp32, any strides.
        kv_cache: [num_blocks, Hkv, block_size, 2*D], same dtype as query, any strides.
        block_table: [B, max_pages] int32.
        query_start_loc: [B + 1] int32, row b's tokens are query[qsl[b]:qsl[b + 1]].
        seq_lens: [B] int32, context length per row including its new tokens (>= its query length).
        scale: softmax scale (usually D ** -0.5).
        out: optional [T, Hq, D] output in query's dtype (any strides), written in place.
        block_m: query rows (tokens x group heads) per program, power of two >= 16; default by dtype.
        block_n: keys per tile, power of two >= 16; default by dtype.

    Returns:
        out [T, Hq, D] in query's dtype.
    """
    _check_args(query, kv_cache, block_table, query_start_loc, seq_lens, out)
    t, hq, d = query.shape
    _, hkv, page_size, _ = kv_cache.shape
    num_rows = seq_lens.shape[0]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(query)
    if t == 0 or num_rows == 0:
        return out
    def_m, def_n, num_warps, num_stages = _default_tiles(query)
    block_m = max(block_m or def_m, triton.next_power_of_2(group))
    block_n = block_n or def_n
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        assert v >= 16 and v & (v - 1) == 0, f"{name} must be a power of two >= 16, got {v}"
    block_q = block_m // group
    _paged_prefill_kernel[(t // block_q + num_rows, hkv)](
        query, kv_cache, block_table, query_start_loc, seq_lens, out,
        num_rows, scale * _LOG2E,
        *query.stride(), *kv_cache.stride(), *block_table.stride(), *out.stride(),
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def paged_prefill_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    **_tiles,
) -> torch.Tensor:
    """Pure-torch reference (float64 softmax), same arguments as ``paged_prefill`` (tile sizes ignored).

    Loops over rows and KV heads, gathers each row's context through the block table.
    """
    _check_args(query, kv_cache, block_table, query_start_loc, seq_lens, out)
    t, hq, d = query.shape
    hkv, page_size = kv_cache.shape[1], kv_cache.shape[2]
    group = hq // hkv
    o64 = torch.zeros((t, hq, d), dtype=torch.float64, device=query.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_lo, q_hi = qsl[b], qsl[b + 1]
        if q_hi == q_lo:
            continue
        assert seq_len >= q_hi - q_lo, f"row {b}: seq_len {seq_len} < query length {q_hi - q_lo}"
        pos = torch.arange(seq_len, device=query.device)
        kv = kv_cache[block_table[b, pos // page_size].long(), :, pos % page_size].to(torch.float64)  # [L, Hkv, 2D]
        q_pos = torch.arange(seq_len - (q_hi - q_lo), seq_len, device=query.device)
        causal = pos[None, :] <= q_pos[:, None]  # [Q, L]
        for g in range(hkv):
            heads = slice(g * group, (g + 1) * group)
            q = query[q_lo:q_hi, heads].to(torch.float64).transpose(0, 1)  # [G, Q, D]
            s = (q @ kv[:, g, :d].T) * scale  # [G, Q, L]
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
            o64[q_lo:q_hi, heads] = (p @ kv[:, g, d:]).transpose(0, 1)
    if out is None:
        out = torch.empty_like(query)
    out.copy_(o64.to(query.dtype))
    return out
