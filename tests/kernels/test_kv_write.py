# SPDX-License-Identifier: Apache-2.0
"""Tests for the paged KV-cache write kernel (kernels/kv_write.py)."""

import pytest
import torch
from paged_inputs import (  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
    BLOCK_SIZE, DEVICE, cache_view, load_package_reference, strided_cache,
)

from kernels.kv_write import write_kv, write_kv_ref  # noqa: E402

# (Hkv, D): a power-of-two shape, and non-power-of-two heads and head size (masked tiles).
SHAPES = [(2, 64), (3, 80)]
# (cache dtype, input dtype): exact copies, and a down-cast fp32 -> fp16 as in a fp16 cache.
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
# "padded": extra head / channels around the logical view; "permuted": physical [blocks, bs, Hkv, 2D];
# "every_other": every second channel of a [blocks, Hkv, bs, 4D] buffer (non-unit channel stride).
LAYOUTS = ["padded", "permuted", "every_other"]
# Tokens written per call: a few decode tokens and a prefill-sized batch, both with padding mixed in.
NUM_TOKENS = [5, 70]
# Physical blocks, more than the tokens need, so that the slots are scattered.
NUM_BLOCKS = 13


def _make_cache(hkv, d, dtype, layout, *, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, seed=0):
    """(physical allocation, strided cache view of it); see LAYOUTS."""
    gen = torch.Generator().manual_seed(seed)
    return strided_cache(num_blocks, hkv, dtype, layout, gen, head_dim=d, block_size=block_size,
                         view_on_device=True)


def _make_tokens(t, hkv, d, dtype, *, num_slots=NUM_BLOCKS * BLOCK_SIZE, slot_dtype=torch.int64, seed=1):
    """Strided key/value [T, Hkv, D] (views of a fused qkv-like buffer) and unique slots with -1 padding."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, hkv, 3 * d + 4, generator=gen).to(dtype).to(DEVICE)
    key, value = qkv[..., 2:2 + d], qkv[..., 2 + 2 * d:2 + 3 * d]
    slots = torch.randperm(num_slots, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.25] = -1
    slots[0] = -1
    if t > 2:  # the first and the last slot of the cache (edge blocks and offsets)
        slots[slots == 0], slots[slots == num_slots - 1] = -1, -1
        slots[1], slots[-1] = 0, num_slots - 1
    return key, value, slots.to(slot_dtype).to(DEVICE)


@pytest.mark.parametrize("t", NUM_TOKENS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cache_dtype,in_dtype", DTYPES)
@pytest.mark.parametrize("hkv,d", SHAPES)
def test_matches_reference(hkv, d, cache_dtype, in_dtype, layout, t):
    base, kv_cache = _make_cache(hkv, d, cache_dtype, layout)
    base_ref = base.clone()
    kv_ref = cache_view(base_ref, layout, d)
    key, value, slots = _make_tokens(t, hkv, d, in_dtype)
    write_kv(kv_cache, key, value, slots)
    write_kv_ref(kv_ref, key, value, slots)
    # Bit-exact over the whole allocation: the padding around the view is untouched too.
    assert torch.equal(base, base_ref)
    # Sanity: the written slots hold the (cast) inputs, the skipped ones are unchanged.
    valid = slots >= 0
    blocks, offs = slots[valid] // BLOCK_SIZE, slots[valid] % BLOCK_SIZE
    assert torch.equal(kv_cache[blocks, :, offs, :d], key[valid].to(cache_dtype))
    assert torch.equal(kv_cache[blocks, :, offs, d:], value[valid].to(cache_dtype))


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_slot_dtypes_and_all_padding(slot_dtype):
    hkv, d = 3, 80
    base, kv_cache = _make_cache(hkv, d, torch.float32, "padded")
    before = base.clone()
    key, value, slots = _make_tokens(9, hkv, d, torch.float32, slot_dtype=slot_dtype)
    write_kv(kv_cache, key, value, torch.full_like(slots, -1))  # only padding: nothing changes
    write_kv(kv_cache, key[:0], value[:0], slots[:0])  # no tokens at all
    assert torch.equal(base, before)
    write_kv(kv_cache, key, value, slots)
    write_kv_ref(cache_view(before, "padded", d), key, value, slots)
    assert torch.equal(base, before)


def test_large_num_blocks():
    """Cache offsets past 2**31 elements (a big cache) must not overflow 32-bit index math.

    The 4 GiB cache is torch.empty: only the pages the kernel writes are ever touched."""
    hkv, d, bs = 1, 16, BLOCK_SIZE
    num_blocks = 2**31 // (hkv * bs * 2 * d) + 64
    kv_cache = torch.empty(num_blocks, hkv, bs, 2 * d, dtype=torch.float16, device=DEVICE)
    key, value, _ = _make_tokens(4, hkv, d, torch.float16)
    slots = [-1, (num_blocks - 1) * bs + 3, (num_blocks - 40) * bs, 5]  # fit int32, offsets do not
    slots = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    write_kv(kv_cache, key, value, slots)
    for i in range(1, 4):
        s = int(slots[i])
        assert torch.equal(kv_cache[s // bs, :, s % bs, :d], key[i])
        assert torch.equal(kv_cache[s // bs, :, s % bs, d:], value[i])


def test_heads_split_over_programs():
    """Hkv * D above one program's tile (D 512, Hkv 3): heads are spread over grid axis 1."""
    hkv, d = 3, 512
    base, kv_cache = _make_cache(hkv, d, torch.float32, "every_other")
    base_ref = base.clone()
    key, value, slots = _make_tokens(6, hkv, d, torch.float32)
    write_kv(kv_cache, key, value, slots)
    write_kv_ref(cache_view(base_ref, "every_other", d), key, value, slots)
    assert torch.equal(base, base_ref)


def test_reference_equals_package_reference():
    """write_kv_ref has the semantics of vllm_sparse.reference.write_kv (loaded without vLLM)."""
    ref = load_package_reference()
    hkv, d = 3, 80
    base, kv_cache = _make_cache(hkv, d, torch.float16, "permuted")
    base_pkg = base.clone()
    key, value, slots = _make_tokens(40, hkv, d, torch.float32, slot_dtype=torch.int32)
    write_kv_ref(kv_cache, key, value, slots)
    ref.write_kv(cache_view(base_pkg, "permuted", d), key, value, slots)
    assert torch.equal(base, base_pkg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama8b_shapes(dtype):
    """Llama-3.1-8B cache (Hkv 8, D 128, block 16): an 8K-token prefill and a 256-token decode batch."""
    hkv, d, num_blocks = 8, 128, 1024
    for t in (8192, 256):
        base, kv_cache = _make_cache(hkv, d, dtype, "padded", num_blocks=num_blocks, seed=t)
        base_ref = base.clone()
        key, value, slots = _make_tokens(t, hkv, d, dtype, num_slots=num_blocks * BLOCK_SIZE, seed=t + 1)
        write_kv(kv_cache, key, value, slots.to(torch.int32))
        write_kv_ref(cache_view(base_ref, "padded", d), key, value, slots)
        assert torch.equal(base, base_ref)
