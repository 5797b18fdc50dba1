# SPDX-License-Identifier: Apache-2.0
"""Tests for the Numba sparse paged decode on the CPU (kernels/cpu_sparse_decode.py).

Checked against the Triton kernel's pure-torch reference (`sparse_paged_decode_ref`) and an
independent python-set union with a float64 softmax, on strided cache views of every layout
the Triton tests use (vLLM's own is "permuted": token-major blocks)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from paged_inputs import (  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
    BLOCK_SIZE, HEAD_DIM, decode_inputs, dense_union_attention, random_selection,
)

# imported as the engine imports it: Numba's on-disk cache records the module name
from vllm_sparse.kernels.cpu_sparse_decode import cpu_sparse_paged_decode  # noqa: E402
from kernels.sparse_decode import sparse_paged_decode_ref  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the inputs are built on the "
                                "GPU there; this kernel is CPU-only and runs in the CPU CI")
GQA = [(4, 4), (6, 2), (9, 3), (10, 2)]   # groups 1, 3, 3 (SmolLM2: 9 query, 3 KV heads), 5
MODES = ["page", "token"]
# "every_other" has a non-unit channel stride: the launcher copies it first
LAYOUTS = ["permuted", "padded", "every_other"]
SEQ_LENS = [1, 29, 150, 0]
NUM_SELECTED = {"page": 5, "token": 40}
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_and_counts(mode, hq, hkv, layout):
    query, kv_cache, block_table, seq_lens = decode_inputs(SEQ_LENS, hq, hkv, torch.float32,
                                                           layout=layout)
    selected = random_selection(SEQ_LENS, hkv, mode, NUM_SELECTED[mode])
    args = (query, kv_cache, block_table, seq_lens, selected, mode, 4, 32)
    out, attended, lse = cpu_sparse_paged_decode(*args, return_lse=True)
    ref_out, ref_lse, ref_attended = sparse_paged_decode_ref(*args)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    assert torch.equal(attended, ref_attended.long())
    union_out, union_counts = dense_union_attention(*args, HEAD_DIM ** -0.5)
    assert torch.equal(attended, union_counts)
    torch.testing.assert_close(out[:3], union_out[:3].float(), **TOL)
    assert torch.all(out[3] == 0) and torch.all(lse[3] == float("-inf"))   # empty context


@pytest.mark.parametrize("mode", MODES)
def test_per_row_sinks_and_window_and_scale(mode):
    """Sinks and window given per row (as the backend passes them), a custom scale."""
    query, kv_cache, block_table, seq_lens = decode_inputs(SEQ_LENS[:3], 6, 2, torch.float32,
                                                           layout="permuted", seed=4)
    selected = random_selection(SEQ_LENS[:3], 2, mode, NUM_SELECTED[mode], seed=5)
    sinks, window = torch.tensor([0, 3, 1]), torch.tensor([0, 40, 7])
    out, attended = cpu_sparse_paged_decode(query, kv_cache, block_table, seq_lens, selected, mode,
                                            sinks, window, 0.3)
    for i in range(3):
        row = (query[i:i + 1], kv_cache, block_table[i:i + 1], seq_lens[i:i + 1], selected[i:i + 1],
               mode, int(sinks[i]), int(window[i]), 0.3)
        ref_out, _, ref_attended = sparse_paged_decode_ref(*row)
        torch.testing.assert_close(out[i:i + 1], ref_out, **TOL)
        assert torch.equal(attended[i:i + 1], ref_attended.long())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_sink_weights_equal_weighted_gather_attention(hq, hkv, layout):
    """SparseK's read set: per-row sinks [0, m) with per-head value weights (some sinks past
    the weights' width, weight 1) and a window, against gathering those tokens and
    `reference.attend` with value weights; weights of 1 give the unweighted kernel."""
    from vllm_sparse import reference

    lens = SEQ_LENS[:3]
    query, kv_cache, block_table, seq_lens = decode_inputs(lens, hq, hkv, torch.float32,
                                                           layout=layout, seed=7)
    gen = torch.Generator().manual_seed(8)
    sinks, window = torch.tensor([1, 20, 48]), torch.tensor([4, 8, 40])
    weights = torch.rand(3, hkv, 40, generator=gen)                # row 2: sinks 40..47 at 1
    empty = torch.zeros(3, hkv, 0, dtype=torch.long)
    out, attended = cpu_sparse_paged_decode(query, kv_cache, block_table, seq_lens, empty,
                                            "token", sinks, window, sink_weights=weights)
    for i, t_len in enumerate(lens):
        m = min(int(sinks[i]), t_len)
        positions = torch.cat([torch.arange(m), torch.arange(max(m, t_len - int(window[i])),
                                                             t_len)])
        w = torch.cat([torch.nn.functional.pad(weights[i], (0, 48), value=1.0)[:, :m],
                       torch.ones(hkv, len(positions) - m)], 1)
        key, value = reference.gather_kv(kv_cache, block_table[i:i + 1],
                                         positions.expand(1, hkv, -1))
        valid = torch.ones(1, hkv, len(positions), dtype=torch.bool)
        want = reference.attend(query[i:i + 1], key, value, valid, HEAD_DIM ** -0.5, w[None])[0]
        torch.testing.assert_close(out[i:i + 1], want, **TOL)
        assert attended[i].tolist() == [len(positions)] * hkv
    plain = cpu_sparse_paged_decode(query, kv_cache, block_table, seq_lens, empty, "token",
                                    sinks, window)[0]
    ones = cpu_sparse_paged_decode(query, kv_cache, block_table, seq_lens, empty, "token",
                                   sinks, window, sink_weights=torch.ones(3, hkv, 48))[0]
    torch.testing.assert_close(ones, plain, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, plain, atol=1e-3)
    with pytest.raises(ValueError, match=r"sink_weights \(3, 2\); expected \[3, "):
        cpu_sparse_paged_decode(query, kv_cache, block_table, seq_lens, empty, "token", sinks,
                                window, sink_weights=torch.ones(3, 2))


def test_everything_selected_is_dense_attention():
    """Every page selected (the backend's dense rows) equals SDPA over the whole context."""
    seq_lens = [70, 150]
    query, kv_cache, block_table, seq_lens_t = decode_inputs(seq_lens, 9, 3, torch.float32,
                                                             layout="permuted", seed=6)
    pages = torch.arange(-(-150 // BLOCK_SIZE)).expand(2, 3, -1)
    out, attended = cpu_sparse_paged_decode(query, kv_cache, block_table, seq_lens_t, pages)
    assert attended.tolist() == [[70] * 3, [150] * 3]
    for i, t_len in enumerate(seq_lens):
        pos = torch.arange(t_len)
        kv = kv_cache[block_table[i, pos // BLOCK_SIZE].long(), :, pos % BLOCK_SIZE]   # [T, Hkv, 2D]
        k = kv[..., :HEAD_DIM].repeat_interleave(3, dim=1).transpose(0, 1)
        v = kv[..., HEAD_DIM:].repeat_interleave(3, dim=1).transpose(0, 1)
        expected = torch.nn.functional.scaled_dot_product_attention(query[i][:, None], k, v)
        torch.testing.assert_close(out[i], expected[:, 0], **TOL)


def test_bad_inputs_are_named():
    query, kv_cache, block_table, seq_lens = decode_inputs([20], 4, 2, torch.float32)
    selected = random_selection([20], 2, "page", 2)
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_sparse_paged_decode(query, kv_cache.to(torch.bfloat16), block_table, seq_lens, selected)
    with pytest.raises(ValueError, match="'tokens'.*'page', 'token'"):
        cpu_sparse_paged_decode(query, kv_cache, block_table, seq_lens, selected, "tokens")
    with pytest.raises(ValueError, match="does not fit"):
        cpu_sparse_paged_decode(query[:, :3], kv_cache, block_table, seq_lens, selected)


@pytest.mark.skipif(any(k in os.environ for k in ("NUMBA_THREADING_LAYER",
                                                  "NUMBA_THREADING_LAYER_PRIORITY")),
                    reason="the user chose Numba's threading layer")
def test_kernels_run_on_numba_openmp_layer_and_keep_torch_threads():
    """kernels/numba_setup.py puts Numba's parallel loops on its OpenMP layer (torch's libgomp
    pool, shared with torch), not its own workqueue threads beside torch's; and starting that
    pool leaves torch's thread count as it was. In a fresh process, since the pool starts
    once per process."""
    script = textwrap.dedent("""
        import numba, torch
        from paged_inputs import decode_inputs, random_selection
        from vllm_sparse.kernels.cpu_sparse_decode import cpu_sparse_paged_decode
        torch.set_num_threads(1)
        query, kv_cache, block_table, seq_lens = decode_inputs([40], 4, 2, torch.float32)
        cpu_sparse_paged_decode(query, kv_cache, block_table, seq_lens,
                                random_selection([40], 2, "page", 2))
        print(numba.threading_layer(), torch.get_num_threads())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["omp", "1"]
