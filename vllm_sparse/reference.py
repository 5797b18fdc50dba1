# SPDX-License-Identifier: Apache-2.0
"""Pure-torch mechanism over vLLM's paged KV cache: the CPU path and the test oracle.

Cache layout (vLLM 0.32's logical per-layer view, any strides):
    kv_cache: [num_blocks, num_kv_heads, block_size, 2 * head_size]; keys are
    `kv_cache[..., :D]`, values `kv_cache[..., D:]`. Token t of a sequence lives in
    block `block_table[t // block_size]` at offset `t % block_size`.

A page-mode selection is `pages: [N, Hkv, K]` int (logical page ids, -1 padded) plus
per-row `num_sink_tokens` S and `local_window` W ([N] tensors, or ints for all rows).
The attended set of (row n, KV head h) is the union, each token once, of the sinks
`t < S`, the window `T - W <= t < T` and every token of the selected pages, all limited
to `t < T` (T = `seq_lens[n]`, the current token included).
"""

import torch
import torch.nn.functional as F


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, Hkv, D] at `slot_mapping` [T] (slot = block * bs + offset; < 0 skipped)."""
    head_size = key.shape[-1]
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :head_size] = key[valid].to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_size:] = value[valid].to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [N, Hkv, L, D] at logical `positions` [N, Hkv, L] (must be >= 0)."""
    num_rows, num_kv_heads, length = positions.shape
    block_size, head_size = kv_cache.shape[2], kv_cache.shape[3] // 2
    page = (positions // block_size).reshape(num_rows, -1)
    blocks = block_table.long().gather(1, page).view_as(positions)
    heads = torch.arange(num_kv_heads, device=positions.device)[None, :, None]
    kv = kv_cache[blocks, heads, positions % block_size]
    return kv[..., :head_size], kv[..., head_size:]


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           valid: torch.Tensor, scale: float,
           value_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of query [N, Hq, D] over key/value [N, Hkv, L, D] where valid [N, Hkv, L].

    key/value may have a leading dim of 1 (one request's context shared by all rows).
    value_weights [N, Hkv, L] (optional) scale each value after the softmax, without
    renormalising (SparseK's p). Returns (out [N, Hq, D] in query's dtype, lse [N, Hq]
    fp32). GQA: query head h reads KV head h // (Hq // Hkv).
    """
    num_rows, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    q = query.view(num_rows, num_kv_heads, num_heads // num_kv_heads, head_size).float()
    kv_rows = "" if key.shape[0] == 1 and num_rows > 1 else "n"
    if not kv_rows:
        key, value = key[0], value[0]
    scores = torch.einsum(f"nhgd,{kv_rows}hld->nhgl", q, key.float()) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if value_weights is not None:
        probs = probs * value_weights[:, :, None, :].float()
    out = torch.einsum(f"nhgl,{kv_rows}hld->nhgd", probs, value.float())
    return out.reshape(num_rows, num_heads, head_size).to(query.dtype), lse.reshape(num_rows, num_heads)


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     valid: torch.Tensor, scale: float) -> torch.Tensor:
    """`attend`'s output for rows sharing one context, through torch's fused SDPA.

    query [N, Hq, D], key/value [1, Hkv, L, D], valid [N, Hkv, L] (each row attends at least
    one token) -> out [N, Hq, D] in query's dtype; the same numbers as `attend` up to float
    rounding, without its lse and value weights, and without its [N, Hq, L] float scores
    (3-4x faster on CPU at prefill sizes).
    """
    num_rows, num_heads, _ = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    mask = valid.transpose(0, 1)[:, None].expand(num_kv_heads, group, num_rows, -1)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.to(query.dtype), value.to(query.dtype),
        attn_mask=mask.reshape(1, num_heads, num_rows, -1), scale=scale,
        enable_gqa=group > 1)
    return out[0].transpose(0, 1)


def move_tokens(kv_cache: torch.Tensor, block_table_row: torch.Tensor, heads: torch.Tensor,
                source: torch.Tensor, target: torch.Tensor) -> None:
    """Copy KV head `heads[m]`'s K/V of one request from logical position `source[m]` to
    `target[m]` (all [M]). Every source is read before any target is written, so the two
    sets may overlap."""
    block_size = kv_cache.shape[2]
    table = block_table_row.long()
    moved = kv_cache[table[source // block_size], heads, source % block_size]   # a copy
    kv_cache[table[target // block_size], heads, target % block_size] = moved


def group_max_probs(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Attention weights [N, Hkv, L] fp32 of query [N, Hq, D] over key [N or 1, Hkv, L, D]
    where valid [N, Hkv, L], maximised over the query heads of each KV head (0 where not
    valid): what Recycled Attention ranks tokens by."""
    num_rows, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    q = query.view(num_rows, num_kv_heads, num_heads // num_kv_heads, head_size).float()
    kv_rows = "" if key.shape[0] == 1 and num_rows > 1 else "n"
    if not kv_rows:
        key = key[0]
    scores = torch.einsum(f"nhgd,{kv_rows}hld->nhgl", q, key.float()) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0).amax(dim=2)


def token_validity(tokens: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Token-mode selection tokens [N, Hkv, W] (-1 padded) -> valid [N, Hkv, W]."""
    return (tokens >= 0) & (tokens < seq_lens.long()[:, None, None])


def _per_row(value, seq_lens: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, device=seq_lens.device).long().expand(seq_lens.shape[0])


def selection_pages(pages: torch.Tensor, seq_lens: torch.Tensor, num_sink_tokens,
                    local_window, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same selection as whole pages: page ids [N, Hkv, P] (-1: none) and the validity
    [N, Hkv, P * block_size] of each of their tokens. Reading whole pages is much cheaper
    than reading tokens one by one; each attended token is valid in exactly one place
    (sink pages: t < S; selected pages: S <= t < T - W; window pages: t >= max(T - W, S))."""
    num_rows, num_kv_heads, _ = pages.shape
    device = pages.device
    ctx = seq_lens.long()[:, None, None]
    sinks_n = _per_row(num_sink_tokens, seq_lens)[:, None, None]
    window_n = _per_row(local_window, seq_lens)[:, None, None]
    sink_pages = -(-int(sinks_n.max()) // block_size) if num_rows else 0
    window_pages = -(-int(window_n.max()) // block_size) + 1 if num_rows else 0
    first_window_page = (ctx - window_n).clamp(min=0) // block_size
    ids = torch.cat([
        torch.arange(sink_pages, device=device).expand(num_rows, num_kv_heads, -1),
        pages.long(),
        (first_window_page + torch.arange(window_pages, device=device)).expand(-1, num_kv_heads, -1),
    ], dim=-1)
    kind = torch.cat([torch.zeros(sink_pages, dtype=torch.long, device=device),
                      torch.ones(pages.shape[-1], dtype=torch.long, device=device),
                      torch.full((window_pages,), 2, dtype=torch.long, device=device)])
    pos = ids[..., None] * block_size + torch.arange(block_size, device=device)   # [N, H, P, bs]
    kind, lo, hi = kind[:, None], sinks_n[..., None], (ctx - window_n)[..., None]
    valid = torch.where(kind == 0, pos < lo,
                        torch.where(kind == 1, (pos >= lo) & (pos < hi), pos >= torch.maximum(hi, lo)))
    readable = (ids >= 0) & (ids * block_size < ctx)    # page exists in the block table
    valid &= readable[..., None] & (pos < ctx[..., None])
    return ids.where(readable, 0), valid.flatten(2)


def gather_pages(kv_cache: torch.Tensor, block_table: torch.Tensor,
                 page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [N, Hkv, P * block_size, D] of logical pages `page_ids` [N, Hkv, P]."""
    num_rows, num_kv_heads, num_pages = page_ids.shape
    head_size = kv_cache.shape[3] // 2
    blocks = block_table.long().gather(1, page_ids.reshape(num_rows, -1)).view_as(page_ids)
    heads = torch.arange(num_kv_heads, device=page_ids.device)[None, :, None]
    kv = kv_cache[blocks, heads].flatten(2, 3)                       # [N, H, P * bs, 2D]
    return kv[..., :head_size], kv[..., head_size:]


def selection_mask(pages: torch.Tensor, seq_lens: torch.Tensor, num_sink_tokens,
                   local_window, block_size: int, length: int) -> torch.Tensor:
    """The same selection as a boolean mask [N, Hkv, length] over logical positions."""
    num_rows, num_kv_heads, _ = pages.shape
    num_pages = -(-length // block_size)
    page_mask = torch.zeros(num_rows, num_kv_heads, num_pages + 1, dtype=torch.bool,
                            device=pages.device)
    page_mask.scatter_(-1, pages.long().where(pages >= 0, num_pages), True)
    mask = page_mask[..., :num_pages].repeat_interleave(block_size, dim=-1)[..., :length]
    pos = torch.arange(length, device=pages.device)
    ctx = seq_lens.long()[:, None, None]
    sinks_n = _per_row(num_sink_tokens, seq_lens)[:, None, None]
    window_n = _per_row(local_window, seq_lens)[:, None, None]
    mask |= (pos < sinks_n) | (pos >= ctx - window_n)
    return mask & (pos < ctx)


def dense_prefill(query: torch.Tensor, kv_cache: torch.Tensor, block_table_row: torch.Tensor,
                  seq_len: int, scale: float) -> torch.Tensor:
    """Causal attention of one request's new tokens, query [Q, Hq, D], over its whole context.

    The query tokens are the last Q of the `seq_len` context tokens (chunked prefill and
    prefix-cache hits included); their K/V must already be in the cache.
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = kv_cache.shape[1]
    positions = torch.arange(seq_len, device=query.device).expand(1, num_kv_heads, -1)
    key, value = gather_kv(kv_cache, block_table_row[None], positions)
    if seq_len == num_tokens:  # no earlier context: SDPA's causal fast path
        mask = None
    else:
        q_pos = torch.arange(seq_len - num_tokens, seq_len, device=query.device)
        mask = q_pos[:, None] >= torch.arange(seq_len, device=query.device)[None, :]
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.to(query.dtype), value.to(query.dtype),
        attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=num_heads != num_kv_heads)
    return out[0].transpose(0, 1)
