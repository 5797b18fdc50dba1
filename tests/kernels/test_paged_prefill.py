# SPDX-License-Identifier: Apache-2.0
"""Tests for the causal paged prefill attention kernel (kernels/paged_prefill.py)."""

import pytest
import torch
from paged_inputs import (  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
    BLOCK_SIZE, DEVICE, HEAD_DIM, load_package_reference, num_pages, shuffled_block_table, strided_cache,
)

from kernels.paged_prefill import paged_prefill, paged_prefill_ref  # noqa: E402

# Group sizes 1, 3, 5, 4, 8: equal heads, non-power-of-two groups (partly empty BLOCK_M rows), MQA-like 8:1.
GQA = [(4, 4), (6, 2), (5, 1), (8, 2), (8, 1)]
# fp32 checks the math tightly; fp16 is the low-precision path the interpreter computes correctly
# (bf16 tl.dot is wrong under TRITON_INTERPRET, so bf16 is covered by the GPU test only).
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 3e-3, 3e-3)]
# (query length, context length) per row: a decode-like single token after a prefix-cache hit,
# a short chunk, a chunk that is not tile aligned, and a full prompt (context == query).
ROWS = [(1, 40), (5, 18), (37, 70), (64, 64)]
# (block_m, block_n) for the small-tile test: several query tiles per row (BLOCK_Q = 32 // group
# tokens) and key tiles that span two cache blocks; the other tests use the launcher's defaults.
SMALL_TILES = (32, 32)


def _make_inputs(rows, hq, hkv, dtype, *, block_size=BLOCK_SIZE, head_dim=HEAD_DIM, layout="padded", seed=0):
    """Random query [T, Hq, D], a *strided* kv_cache view, a shuffled block table, query_start_loc, seq_lens."""
    gen = torch.Generator().manual_seed(seed)
    n = len(rows)
    max_pages = num_pages([ctx for _, ctx in rows], block_size)
    num_blocks = n * max_pages + 7  # more physical blocks than needed
    # Views are taken on DEVICE: .to(device) would make a non-dense view contiguous.
    _, kv_cache = strided_cache(num_blocks, hkv, dtype, layout, gen, head_dim=head_dim, block_size=block_size,
                                view_on_device=True)
    block_table = shuffled_block_table(n, max_pages, num_blocks, gen)
    q_lens = [q for q, _ in rows]
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    # query as a strided view (e.g. a slice of a fused qkv projection)
    query = torch.randn(sum(q_lens), hq, head_dim + 4, generator=gen).to(dtype).to(DEVICE)[..., 2:2 + head_dim]
    return (query, kv_cache, block_table.to(torch.int32).to(DEVICE),
            qsl.to(torch.int32).to(DEVICE), torch.tensor([c for _, c in rows], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_matches_reference(hq, hkv, dtype, atol, rtol):
    args = _make_inputs(ROWS, hq, hkv, dtype, layout="padded" if hkv == 1 else "permuted")
    out = paged_prefill(*args, 0.3)
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out, paged_prefill_ref(*args, 0.3), atol=atol, rtol=rtol)


@pytest.mark.parametrize("hq,hkv", GQA)
def test_small_tiles(hq, hkv):
    """Many query tiles per row, partial GROUP packing, key tiles across pages, channel stride 2 (fp32)."""
    args = _make_inputs(ROWS, hq, hkv, torch.float32, layout="every_other", seed=hq)
    out = paged_prefill(*args, 0.3, block_m=SMALL_TILES[0], block_n=SMALL_TILES[1])
    torch.testing.assert_close(out, paged_prefill_ref(*args, 0.3), atol=2e-5, rtol=2e-5)


def test_reference_equals_package_reference():
    """paged_prefill_ref == vllm_sparse.reference.dense_prefill row by row (the backend's torch path)."""
    ref = load_package_reference()
    hq, hkv = 6, 2
    query, kv_cache, block_table, qsl, seq_lens = _make_inputs(ROWS, hq, hkv, torch.float32, layout="permuted")
    out = paged_prefill_ref(query, kv_cache, block_table, qsl, seq_lens, HEAD_DIM ** -0.5)
    for b in range(len(ROWS)):
        lo, hi = int(qsl[b]), int(qsl[b + 1])
        expected = ref.dense_prefill(query[lo:hi], kv_cache, block_table[b], int(seq_lens[b]), HEAD_DIM ** -0.5)
        torch.testing.assert_close(out[lo:hi], expected, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_full_prefill():
    """A prompt computed in chunks (later chunks over a cached prefix) equals the one-shot prefill."""
    hq, hkv, length = 8, 2, 75
    query, kv_cache, block_table, _, _ = _make_inputs([(length, length)], hq, hkv, torch.float32)
    full = paged_prefill(query, kv_cache, block_table, torch.tensor([0, length], dtype=torch.int32, device=DEVICE),
                         torch.tensor([length], dtype=torch.int32, device=DEVICE), 0.2, block_m=32, block_n=16)
    # The same prompt as three rows sharing the block table: chunks [0, 20), [20, 21), [21, 75).
    cuts = [0, 20, 21, length]
    chunked = paged_prefill(query, kv_cache, block_table.expand(3, -1).contiguous(),
                            torch.tensor(cuts, dtype=torch.int32, device=DEVICE),
                            torch.tensor(cuts[1:], dtype=torch.int32, device=DEVICE), 0.2)
    torch.testing.assert_close(chunked, full, atol=2e-6, rtol=2e-6)


def test_empty_rows_odd_shapes_and_out_argument():
    """Rows without new tokens, head size 80, block size 24, group 3, a strided `out` written in place."""
    rows, hq, hkv, d, bs = [(0, 10), (9, 50), (0, 0), (30, 30)], 6, 2, 80, 24
    query, kv_cache, block_table, qsl, seq_lens = _make_inputs(rows, hq, hkv, torch.float16, block_size=bs,
                                                               head_dim=d, layout="permuted")
    out_buf = torch.zeros(query.shape[0], hq, d + 16, dtype=torch.float16, device=DEVICE)
    out = out_buf[:, :, 8:8 + d]
    res = paged_prefill(query, kv_cache, block_table, qsl, seq_lens, d ** -0.5, out=out, block_m=16, block_n=32)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, paged_prefill_ref(query, kv_cache, block_table, qsl, seq_lens, d ** -0.5),
                               atol=3e-3, rtol=3e-3)
    assert torch.all(out_buf[:, :, :8] == 0) and torch.all(out_buf[:, :, 8 + d:] == 0)
    # No new tokens at all: nothing to launch.
    empty = paged_prefill(query[:0], kv_cache, block_table, torch.zeros_like(qsl), seq_lens, 1.0)
    assert empty.shape == (0, hq, d)


def test_large_num_blocks():
    """Blocks whose offsets exceed 2**31 elements must not overflow 32-bit index math.

    The 4 GiB cache is torch.empty: only the pages that are filled and read are ever touched."""
    hq, hkv, d, bs = 2, 1, 16, BLOCK_SIZE
    num_blocks = 2**31 // (hkv * bs * 2 * d) + 64
    kv_cache = torch.empty(num_blocks, hkv, bs, 2 * d, dtype=torch.float16, device=DEVICE)
    block_table = torch.tensor([[num_blocks - 1, 7, num_blocks - 50]], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    for blk in block_table[0].tolist():
        kv_cache[blk] = torch.randn(hkv, bs, 2 * d, generator=gen).to(torch.float16).to(DEVICE)
    query = torch.randn(20, hq, d, generator=gen).to(torch.float16).to(DEVICE)
    args = (query, kv_cache, block_table, torch.tensor([0, 20], dtype=torch.int32, device=DEVICE),
            torch.tensor([40], dtype=torch.int32, device=DEVICE), 0.25)
    torch.testing.assert_close(paged_prefill(*args, block_n=16), paged_prefill_ref(*args), atol=3e-3, rtol=3e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama8b_shapes(dtype):
    """Llama-3.1-8B attention (Hq 32, Hkv 8, D 128, block 16): 4K-token prompts, a chunk over a cached
    prefix, a single-token row."""
    rows, hq, hkv, d = [(4096, 4096), (1000, 4096), (1, 3001), (2049, 2049)], 32, 8, 128
    args = _make_inputs(rows, hq, hkv, dtype, head_dim=d, seed=7)
    ref = paged_prefill_ref(*args, d ** -0.5)
    torch.testing.assert_close(paged_prefill(*args, d ** -0.5), ref, atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(paged_prefill(*args, d ** -0.5, block_m=64, block_n=32), ref, atol=1e-2, rtol=2e-2)
