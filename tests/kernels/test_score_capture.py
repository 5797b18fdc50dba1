# SPDX-License-Identifier: Apache-2.0
"""Tests for dense paged decode with per-token score capture (kernels/score_capture.py)."""

import pytest
import torch
from paged_inputs import (  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
    BLOCK_SIZE, DEVICE, HEAD_DIM, decode_inputs, gather_kv,
)

from kernels.score_capture import decode_with_scores, decode_with_scores_ref  # noqa: E402

# Group sizes 1, 3, 5, 8: equal heads, non-power-of-two groups and MQA-like 8:1 (4 is in the GPU test).
GQA = [(4, 4), (6, 2), (5, 1), (8, 1)]
# fp32 checks the math tightly; fp16 is the low-precision path the interpreter computes correctly
# (bf16 tl.dot is wrong under TRITON_INTERPRET, so bf16 is covered by the GPU test only).
# Tolerances: (dtype, out atol, out rtol); scores are fp32 computed from the same rounded inputs.
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 3e-3, 3e-3)]
SCORE_TOL = dict(atol=1e-7, rtol=2e-5)  # observed: ~1e-6 relative error
# T = 0 (padded batch row), T = 1 (first decode step), T < one tile, T not a multiple of
# BLOCK_SIZE spanning several 64-token tiles.
SEQ_LENS = [0, 1, 29, 150]


def _make_inputs(seq_lens, hq, hkv, dtype, *, block_size=BLOCK_SIZE, head_dim=HEAD_DIM,
                 layout="padded", seed=0, q_scale=1.0):
    """Random query, a *strided* kv_cache view, a shuffled block table and seq_lens."""
    return decode_inputs(seq_lens, hq, hkv, dtype, block_size=block_size, head_dim=head_dim, layout=layout,
                         seed=seed, q_scale=q_scale)


def _dense_probs(query, kv_cache, block_table, seq_lens, scale):
    """Independent check in float32: (SDPA output [N, Hq, D], per-head softmax list of [Hq, T_i])."""
    n, hq, d = query.shape
    hkv = kv_cache.shape[1]
    outs, probs = [], []
    for i in range(n):
        kv = gather_kv(kv_cache, block_table, i, int(seq_lens[i])).float()  # [T, Hkv, 2D]
        k = kv[..., :d].repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, T, D]
        v = kv[..., d:].repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        q = query[i].float()[:, None]  # [Hq, 1, D]
        if kv.shape[0]:
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)[:, 0])
        else:
            outs.append(torch.zeros(hq, d, device=query.device))
        probs.append(torch.softmax((q @ k.transpose(1, 2))[:, 0] * scale, dim=-1))
    return torch.stack(outs), probs


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_matches_reference(hq, hkv, dtype, atol, rtol):
    query, kv_cache, block_table, seq_lens = _make_inputs(SEQ_LENS, hq, hkv, dtype)
    out, scores = decode_with_scores(query, kv_cache, block_table, seq_lens)
    ref_out, ref_scores = decode_with_scores_ref(query, kv_cache, block_table, seq_lens)
    assert out.dtype == dtype and scores.dtype == torch.float32
    assert scores.shape == (len(SEQ_LENS), hkv, block_table.shape[1] * BLOCK_SIZE)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    assert torch.all(out[0] == 0) and torch.all(scores[0] == 0)  # T = 0
    assert torch.all(scores[1, :, 0] == 1) and torch.all(scores[1, :, 1:] == 0)  # T = 1


@pytest.mark.parametrize("hq,hkv", GQA)
def test_scores_sum_and_padding(hq, hkv):
    """Group of one: scores sum to 1; larger groups: in [1, group]; exactly 0 beyond the context."""
    seq_lens = [77, 150, 16]
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float32, seed=2,
                                                            q_scale=3.0)  # peaked attention
    _, scores = decode_with_scores(query, kv_cache, block_table, seq_lens_t, num_splits=2)
    group = hq // hkv
    for i, t_len in enumerate(seq_lens):
        sums = scores[i, :, :t_len].sum(-1).double()
        if group == 1:
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
        else:
            assert torch.all(sums >= 1 - 1e-5) and torch.all(sums <= group + 1e-5)
        assert torch.all(scores[i, :, :t_len] > 0) and torch.all(scores[i, :, t_len:] == 0)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_against_dense_sdpa(dtype, atol, rtol):
    """Output equals torch SDPA; scores equal the max over the group of an explicit softmax."""
    seq_lens, hq, hkv, scale = [45, 130, 3], 8, 2, 0.3
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, dtype, layout="permuted", seed=4)
    out, scores = decode_with_scores(query, kv_cache, block_table, seq_lens_t, scale, num_splits=2)
    dense_out, probs = _dense_probs(query, kv_cache, block_table, seq_lens_t, scale)
    torch.testing.assert_close(out.float(), dense_out, atol=atol, rtol=rtol)
    for i, t_len in enumerate(seq_lens):
        expect = probs[i].view(hkv, hq // hkv, t_len).amax(dim=1)
        torch.testing.assert_close(scores[i, :, :t_len], expect, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
def test_num_splits(num_splits):
    """Flash-decoding splits (some with no work at all) give the same output and scores."""
    seq_lens, hq, hkv = [300, 17], 4, 2
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float32, seed=5)
    out, scores = decode_with_scores(query, kv_cache, block_table, seq_lens_t, num_splits=num_splits)
    ref_out, ref_scores = decode_with_scores_ref(query, kv_cache, block_table, seq_lens_t)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)


@pytest.mark.parametrize("max_seq_len", [100, 400])
def test_max_seq_len(max_seq_len):
    """Score width L below the context truncates the scores only; above it pads with zeros."""
    seq_lens, hq, hkv = [150, 60], 6, 2
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float32, seed=6)
    args = (query, kv_cache, block_table, seq_lens_t)
    out, scores = decode_with_scores(*args, max_seq_len=max_seq_len, num_splits=3)
    full_out, full_scores = decode_with_scores_ref(*args, max_seq_len=400)
    assert scores.shape == (2, hkv, max_seq_len)
    torch.testing.assert_close(out, full_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(scores, full_scores[..., :max_seq_len], **SCORE_TOL)


def test_odd_shapes_and_out_buffers():
    """Head size 80, block size 24, group 3, strided `out` and `scores_out` written in place."""
    seq_lens, hq, hkv, d, bs = [100, 7, 50], 6, 2, 80, 24
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, torch.float16, block_size=bs,
                                                            head_dim=d, layout="permuted")
    out_buf = torch.zeros(3, hq, d + 16, dtype=torch.float16, device=DEVICE)
    out = out_buf[:, :, 8:8 + d]
    sc_buf = torch.full((hkv, 3, 130), -7.0, device=DEVICE)
    scores = sc_buf[:, :, 2:122].transpose(0, 1)  # [3, hkv, 120], non-contiguous
    args = (query, kv_cache, block_table, seq_lens_t, 0.1)
    res_out, res_scores = decode_with_scores(*args, out=out, scores_out=scores, block_n=16)
    ref_out, ref_scores = decode_with_scores_ref(*args, max_seq_len=120)
    assert res_out.data_ptr() == out.data_ptr() and res_scores.data_ptr() == scores.data_ptr()
    torch.testing.assert_close(out, ref_out, atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL)
    assert torch.all(out_buf[:, :, :8] == 0) and torch.all(out_buf[:, :, 8 + d:] == 0)
    assert torch.all(sc_buf[..., :2] == -7) and torch.all(sc_buf[..., 122:] == -7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama8b_shapes(dtype):
    """Llama-3.1-8B attention (Hq 32, Hkv 8, D 128, block 16), ~32K contexts."""
    seq_lens, hq, hkv, d = [32768, 30001, 4099, 1], 32, 8, 128
    query, kv_cache, block_table, seq_lens_t = _make_inputs(seq_lens, hq, hkv, dtype, head_dim=d, seed=7)
    args = (query, kv_cache, block_table, seq_lens_t)
    ref_out, ref_scores = decode_with_scores_ref(*args)
    for num_splits in (None, 1, 7):
        out, scores = decode_with_scores(*args, num_splits=num_splits)
        torch.testing.assert_close(out, ref_out, atol=1e-2, rtol=2e-2)
        torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=2e-3)
    sums = scores.double().sum(-1)
    assert torch.all(sums >= 1 - 1e-3) and torch.all(sums <= hq // hkv + 1e-3)
