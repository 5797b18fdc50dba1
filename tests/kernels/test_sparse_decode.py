# SPDX-License-Identifier: Apache-2.0
"""Tests for the sparse paged decode attention kernel (kernels/sparse_decode.py)."""

import pytest
import torch
from paged_inputs import (  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
    BLOCK_SIZE, DEVICE, HEAD_DIM, decode_inputs, dense_union_attention, gather_kv, random_selection,
)

from kernels.sparse_decode import sparse_paged_decode, sparse_paged_decode_ref  # noqa: E402

# Group sizes 1, 3, 5, 8: equal heads, non-power-of-two groups and MQA-like 8:1.
GQA = [(4, 4), (6, 2), (5, 1), (8, 1)]
# fp32 checks the math tightly; fp16 is the low-precision path the interpreter computes correctly
# (bf16 tl.dot is wrong under TRITON_INTERPRET, so bf16 is covered by the GPU test only).
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 3e-3, 3e-3)]
MODES = ["page", "token"]
# T = 1 (first decode step), T < sinks + window (everything attended), T not a multiple of
# BLOCK_SIZE with several tiles of every kind.
SEQ_LENS = [1, 29, 150]
NUM_SINKS = 4
WINDOW = 32
# Selected entries per (sequence, KV head): pages in page mode, tokens in token mode.
NUM_SELECTED = {"page": 5, "token": 40}


def _make_inputs(seq_lens, hq, hkv, dtype, *, block_size=BLOCK_SIZE, head_dim=HEAD_DIM,
                 layout="padded", seed=0):
    """Random query, a *strided* kv_cache view, a shuffled block table and seq_lens."""
    return decode_inputs(seq_lens, hq, hkv, dtype, block_size=block_size, head_dim=head_dim, layout=layout,
                         seed=seed)


def _sdpa_dense(query, kv_cache, block_table, seq_lens, scale):
    """Plain dense attention over the whole context with torch SDPA (float32)."""
    n, hq, d = query.shape
    group = hq // kv_cache.shape[1]
    outs = []
    for i in range(n):
        kv = gather_kv(kv_cache, block_table, i, int(seq_lens[i])).float()  # [T, Hkv, 2D]
        k = kv[..., :d].repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, Hq, T, D]
        v = kv[..., d:].repeat_interleave(group, dim=1).transpose(0, 1)[None]
        q = query[i].float()[None, :, None]  # [1, Hq, 1, D]
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode, hq, hkv, dtype, atol, rtol):
    query, kv_cache, block_table, seq_lens = _make_inputs(SEQ_LENS, hq, hkv, dtype)
    selected = random_selection(SEQ_LENS, hkv, mode, NUM_SELECTED[mode])
    args = (query, kv_cache, block_table, seq_lens, selected, mode, NUM_SINKS, WINDOW)
    out, lse = sparse_paged_decode(*args, return_lse=True)
    ref_out, ref_lse, num_attended = sparse_paged_decode_ref(*args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol)
    assert num_attended[0].tolist() == [1] * hkv  # T = 1: only the current token
    assert num_attended[1].tolist() == [29] * hkv  # T < sinks + window: everything


@pytest.mark.parametrize("mode", MODES)
def test_dedupe_against_dense_union_mask(mode):
    """Selections overlapping sinks and window (and beyond T) count each token once."""
    seq_lens, hq, hkv = [70, 150], 6, 2
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float32, seed=3)
    if mode == "page":  # page 0 overlaps the sinks, the last pages the window, 20+ lies beyond T
        rows = [[0, 4, -1, 2, 20], [3, -1, 1, 9, 0]]
    else:  # tokens in the sinks, in the window, beyond T, and in between
        rows = [[0, 3, 69, 149, 40, 10, 200, -1], [1, 60, 140, -1, 5, 100, 151, 2]]
    selected = torch.tensor([rows] * len(seq_lens), dtype=torch.int32, device=DEVICE)
    args = (query, kv_cache, block_table, seq_lens_t, selected, mode, NUM_SINKS, WINDOW, 0.2)
    out = sparse_paged_decode(*args, num_splits=3)
    ref_out, _, num_attended = sparse_paged_decode_ref(*args)
    dense_out, counts = dense_union_attention(*args)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double().cpu(), dense_out, atol=2e-5, rtol=2e-5)
    assert num_attended.cpu().tolist() == counts.tolist()


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_full_selection_equals_dense_sdpa(mode, dtype, atol, rtol):
    """Selecting every page / token (plus sinks and window) is plain dense attention."""
    seq_lens, hq, hkv = [45, 130], 8, 2
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, dtype, layout="permuted")
    num_sel = block_table.shape[1] if mode == "page" else max(seq_lens)
    selected = torch.arange(num_sel, dtype=torch.int32, device=DEVICE).flip(0).expand(2, hkv, num_sel)
    out = sparse_paged_decode(query, kv_cache, block_table, seq_lens_t, selected.contiguous(), mode,
                              NUM_SINKS, WINDOW, num_splits=2)
    torch.testing.assert_close(out.float(), _sdpa_dense(query, kv_cache, block_table, seq_lens_t, HEAD_DIM ** -0.5),
                               atol=atol, rtol=rtol)


def test_short_context_attends_everything():
    """T <= sinks + window with nothing selected is dense attention; num_attended == T."""
    seq_lens, hq, hkv = [1, 5, 20, 36], 5, 1
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float32)
    selected = torch.full((4, hkv, 3), -1, dtype=torch.int32, device=DEVICE)
    args = (query, kv_cache, block_table, seq_lens_t, selected, "token", NUM_SINKS, WINDOW)
    out = sparse_paged_decode(*args)
    _, _, num_attended = sparse_paged_decode_ref(*args)
    assert num_attended[:, 0].tolist() == seq_lens
    torch.testing.assert_close(out, _sdpa_dense(query, kv_cache, block_table, seq_lens_t, HEAD_DIM ** -0.5),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
def test_num_splits(num_splits):
    """Flash-decoding splits (some with no work at all) merge to the same result."""
    seq_lens, hq, hkv = [300, 17], 4, 2
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float32, seed=5)
    selected = random_selection(seq_lens, hkv, "page", 8, seed=6)
    args = (query, kv_cache, block_table, seq_lens_t, selected, "page", NUM_SINKS, WINDOW)
    out, lse = sparse_paged_decode(*args, return_lse=True, num_splits=num_splits)
    ref_out, ref_lse, _ = sparse_paged_decode_ref(*args)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_entries_beyond_context_are_ignored(mode):
    """Out-of-context entries change nothing; an empty attended set gives 0 and lse = -inf."""
    seq_lens, hq, hkv = [40, 9], 4, 2
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float32)
    beyond = [3, 50] if mode == "page" else [40, 41, 1000]
    inside = [1] if mode == "page" else [12, 20]
    sel = torch.tensor([[inside + beyond, [-1] * len(inside) + beyond]] * 2, dtype=torch.int32, device=DEVICE)
    unit = BLOCK_SIZE if mode == "page" else 1
    clean = torch.stack([torch.where(sel[i] * unit >= t_len, -1, sel[i]) for i, t_len in enumerate(seq_lens)])
    for sinks, window in [(2, 3), (0, 0)]:
        args = (query, kv_cache, block_table, seq_lens_t)
        out, lse = sparse_paged_decode(*args, sel, mode, sinks, window, return_lse=True, num_splits=2)
        out_clean = sparse_paged_decode(*args, clean, mode, sinks, window, num_splits=2)
        ref_out, ref_lse, _ = sparse_paged_decode_ref(*args, sel, mode, sinks, window)
        torch.testing.assert_close(out, out_clean, atol=0, rtol=0)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    # (0, 0): KV head 1 of sequence 0 and all of sequence 1 select nothing inside T: empty sets
    assert torch.all(lse[0, :2] > float("-inf"))
    assert torch.all(out[0, 2:] == 0) and torch.all(lse[0, 2:] == float("-inf"))
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


def test_odd_shapes_and_out_argument():
    """Head size 80, block size 24, group 3, a strided `out` buffer that is written in place."""
    seq_lens, hq, hkv, d, bs = [100, 7, 50], 6, 2, 80, 24
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float16, block_size=bs,
                                                            head_dim=d, layout="permuted")
    selected = random_selection(seq_lens, hkv, "page", 3, block_size=bs)
    out_buf = torch.zeros(3, hq, d + 16, dtype=torch.float16, device=DEVICE)
    out = out_buf[:, :, 8:8 + d]
    args = (query, kv_cache, block_table, seq_lens_t, selected, "page", 3, 10)
    res = sparse_paged_decode(*args, out=out)
    ref_out, _, _ = sparse_paged_decode_ref(*args)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ref_out, atol=3e-3, rtol=3e-3)
    assert torch.all(out_buf[:, :, :8] == 0) and torch.all(out_buf[:, :, 8 + d:] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_llama8b_shapes(mode, dtype):
    """Llama-3.1-8B attention (Hq 32, Hkv 8, D 128, block 16), ~32K contexts."""
    seq_lens, hq, hkv, d = [32768, 30001, 4099, 1], 32, 8, 128
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, dtype, head_dim=d, seed=7)
    selected = random_selection(seq_lens, hkv, mode, 128 if mode == "page" else 2048, seed=8)
    args = (query, kv_cache, block_table, seq_lens_t, selected, mode, 64, 64)
    out, lse = sparse_paged_decode(*args, return_lse=True)
    ref_out, ref_lse, _ = sparse_paged_decode_ref(*args)
    torch.testing.assert_close(out, ref_out, atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)
    for num_splits in (1, 7):
        torch.testing.assert_close(sparse_paged_decode(*args, num_splits=num_splits), ref_out, atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", MODES)
def test_per_row_sinks_and_window(mode):
    """Sizes given per row ([N] tensors) equal running each row with its own ints."""
    query, kv_cache, block_table, seq_lens = _make_inputs(SEQ_LENS, 6, 2, torch.float32)
    selected = random_selection(SEQ_LENS, 2, mode, NUM_SELECTED[mode])
    n = len(SEQ_LENS)
    sinks = torch.tensor([(3 * i) % 5 for i in range(n)], dtype=torch.int32, device=DEVICE)
    window = torch.tensor([(7 * i) % 11 for i in range(n)], dtype=torch.int32, device=DEVICE)
    args = (query, kv_cache, block_table, seq_lens, selected, mode)
    out = sparse_paged_decode(*args, sinks, window, num_splits=2)
    ref_out, _, ref_counts = sparse_paged_decode_ref(*args, sinks, window)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for i in range(n):
        row = (query[i:i + 1], kv_cache, block_table[i:i + 1], seq_lens[i:i + 1],
               selected[i:i + 1], mode, int(sinks[i]), int(window[i]))
        single, _, counts = sparse_paged_decode_ref(*row)
        torch.testing.assert_close(ref_out[i:i + 1], single, atol=1e-6, rtol=1e-6)
        assert counts[0].tolist() == ref_counts[i].tolist()
