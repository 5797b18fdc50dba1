# SPDX-License-Identifier: Apache-2.0
"""Write new tokens' keys and values into vLLM's paged KV cache (Triton).

Shapes (T new tokens, Hkv KV heads, D head size):

* ``kv_cache``     [num_blocks, Hkv, block_size, 2*D]  fp16 / bf16 / fp32, any strides;
  keys go to ``kv_cache[..., :D]``, values to ``kv_cache[..., D:]``.
* ``key``, ``value`` [T, Hkv, D]  fp16 / bf16 / fp32 (cast to the cache dtype), any strides.
* ``slot_mapping`` [T] int32 or int64: token ``t`` goes to block ``slot // block_size`` at
  offset ``slot % block_size``. Slots < 0 (padding) are skipped.

Same semantics as ``vllm_sparse.reference.write_kv`` (duplicate slots are not defined).

Implementation: grid ``(T, cdiv(Hkv, BLOCK_H))``. Each program loads one token's slot and,
unless it is negative, copies a ``[BLOCK_H, BLOCK_D]`` tile of heads for both key and value.
"""

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _write_kv_kernel(
    kv_ptr,  # [num_blocks, Hkv, PAGE_SIZE, 2*D]
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    slot_ptr,  # [T] int32 / int64
    stride_kv_block: tl.int64, stride_kv_head: tl.int64, stride_kv_tok: tl.int64,
    stride_kv_dim,  # unannotated so that a unit stride specialises (vectorised stores)
    stride_k_tok: tl.int64, stride_k_head: tl.int64, stride_k_dim,
    stride_v_tok: tl.int64, stride_v_head: tl.int64, stride_v_dim,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # cache block size
    BLOCK_H: tl.constexpr,  # heads per program (power of two)
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token
        return
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k = tl.load(k_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :] * stride_k_dim,
                mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :] * stride_v_dim,
                mask=mask)
    dst = (kv_ptr + (slot // PAGE_SIZE) * stride_kv_block + (slot % PAGE_SIZE) * stride_kv_tok
           + offs_h[:, None] * stride_kv_head + offs_d[None, :] * stride_kv_dim)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HEAD_DIM * stride_kv_dim, v.to(kv_ptr.dtype.element_ty), mask=mask)


def _check_args(kv_cache, key, value, slot_mapping):
    assert kv_cache.dim() == 4, "kv_cache must be [num_blocks, Hkv, block_size, 2*D]"
    assert key.dim() == 3 and key.shape == value.shape, "key/value must both be [T, Hkv, D]"
    t, hkv, d = key.shape
    assert kv_cache.shape[1] == hkv and kv_cache.shape[3] == 2 * d, \
        f"kv_cache {tuple(kv_cache.shape)} does not fit key/value [T, {hkv}, {d}]"
    assert slot_mapping.shape == (t,), f"slot_mapping must be [T={t}], got {tuple(slot_mapping.shape)}"
    assert slot_mapping.dtype in (torch.int32, torch.int64), \
        f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}"
    for name, x in (("kv_cache", kv_cache), ("key", key), ("value", value)):
        assert x.dtype in _DTYPES, f"{name} dtype {x.dtype} not in {_DTYPES}"


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, Hkv, D] into kv_cache at slot_mapping [T] (in place; slots < 0 skipped).

    Args:
        kv_cache: [num_blocks, Hkv, block_size, 2*D] fp16 / bf16 / fp32, any strides.
        key, value: [T, Hkv, D] fp16 / bf16 / fp32, any strides; cast to the cache dtype.
        slot_mapping: [T] int32 or int64, slot = block * block_size + offset, < 0 = padding.
    """
    _check_args(kv_cache, key, value, slot_mapping)
    t, hkv, d = key.shape
    if t == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(hkv), max(1, 1024 // block_d))  # <= 1K elements per tile
    _write_kv_kernel[(t, triton.cdiv(hkv, block_h))](
        kv_cache, key, value, slot_mapping,
        *kv_cache.stride(), *key.stride(), *value.stride(),
        NUM_KV_HEADS=hkv,
        HEAD_DIM=d,
        PAGE_SIZE=kv_cache.shape[2],
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )


def write_kv_ref(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Pure-torch reference, same arguments and semantics as ``write_kv``."""
    _check_args(kv_cache, key, value, slot_mapping)
    d = key.shape[-1]
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :d] = key[valid].to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, d:] = value[valid].to(kv_cache.dtype)
