# SPDX-License-Identifier: Apache-2.0
"""The mechanism switch (`kernels`) and the Numba mechanism against the torch one, on the
backend's own arguments: a Radar selection with per-row sinks and window, dense rows, and
token lists with -1 padding."""

import pytest
import torch

from vllm_sparse.backend import _with_dense_rows
from vllm_sparse.config import RadarConfig
from vllm_sparse.mechanism import NumbaMechanism, TorchMechanism, resolve_kernels
from vllm_sparse.policies.base import DecodeQueries
from vllm_sparse.policies.radar import RadarPolicy

CPU = torch.device("cpu")


def test_auto_picks_numba_for_float32_on_cpu_and_torch_otherwise():
    assert resolve_kernels("auto", CPU, torch.float32) == "numba"
    assert resolve_kernels("auto", CPU, torch.bfloat16) == "torch"     # logged once
    assert resolve_kernels("torch", CPU, torch.float32) == "torch"
    assert resolve_kernels("numba", CPU, torch.float32) == "numba"


def test_bad_kernel_choices_name_the_value():
    with pytest.raises(ValueError, match="kernels='numba' needs a float32 KV cache.*bfloat16"):
        resolve_kernels("numba", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="kernels='cuda'; allowed: auto, triton, torch, numba"):
        resolve_kernels("cuda", CPU, torch.float32)


def _cache(num_blocks=40, hkv=3, block_size=16, head_dim=64, seed=0):
    """A token-major cache view like vLLM's CPU cache: [blocks, Hkv, bs, 2D] over [blocks, bs, Hkv, 2D]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, block_size, hkv, 2 * head_dim, generator=gen).transpose(1, 2)


def test_numba_decode_equals_torch_decode_on_a_radar_selection():
    kv_cache = _cache()
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.tensor([150, 40, 200])
    block_table = torch.randperm(40, generator=gen)[:39].view(3, 13)
    query = torch.randn(3, 9, 64, generator=gen)
    policy = RadarPolicy(RadarConfig(num_sink_tokens=2, local_window=20), 64, 0.125, kernels="numba")
    policy.observe_write(kv_cache, (block_table.flatten() * 16 + 15))
    budgets = torch.tensor([70, 40, 90])
    selection = policy.select(DecodeQueries(query, seq_lens, block_table, budgets), kv_cache)
    dense = budgets >= seq_lens                      # row 1 is attended densely
    pages, sinks, window = _with_dense_rows(selection, dense, seq_lens, 16, 3)
    out, attended = NumbaMechanism().decode(query, kv_cache, block_table, seq_lens, pages, sinks,
                                            window, 0.125)
    ref_out, ref_attended = TorchMechanism().decode(query, kv_cache, block_table, seq_lens, pages,
                                                    sinks, window, 0.125)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    assert torch.equal(attended, ref_attended)
    assert attended[1].tolist() == [40] * 3 and torch.all(attended[[0, 2]] <= budgets[[0, 2], None])

    tokens = torch.tensor([[[5, 149, -1, 7]] * 3, [[0, 39, 40, -1]] * 3, [[199, 100, 3, 2]] * 3])
    out, attended = NumbaMechanism().decode_tokens(query, kv_cache, block_table, seq_lens, tokens,
                                                   0.125)
    ref_out, ref_attended = TorchMechanism().decode_tokens(query, kv_cache, block_table, seq_lens,
                                                           tokens, 0.125)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    assert torch.equal(attended, ref_attended) and attended[:, 0].tolist() == [3, 2, 4]


@pytest.mark.parametrize("num_heads,num_kv_heads,rows,length", [(9, 3, 37, 300), (4, 4, 5, 64),
                                                                (8, 1, 1, 130)])
def test_masked_attention_equals_attend(num_heads, num_kv_heads, rows, length):
    """The SDPA path (prefill and evaluation mode) against the einsum reference, on per-row,
    per-KV-head masks as NAtS's visibility and Radar's selections make them."""
    from vllm_sparse import reference

    gen = torch.Generator().manual_seed(rows)
    query = torch.randn(rows, num_heads, 64, generator=gen)
    key = torch.randn(1, num_kv_heads, length, 64, generator=gen)
    value = torch.randn(1, num_kv_heads, length, 64, generator=gen)
    valid = torch.rand(rows, num_kv_heads, length, generator=gen) < 0.3
    valid[:, :, -1] = True                               # every row attends something
    out = reference.masked_attention(query, key, value, valid, 0.125)
    ref = reference.attend(query, key, value, valid, 0.125)[0]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    only_last = torch.zeros_like(valid)
    only_last[:, :, -1] = True                           # one token: its value, per KV head
    out = reference.masked_attention(query, key, value, only_last, 0.125)
    group = num_heads // num_kv_heads
    expected = value[0, :, -1].repeat_interleave(group, 0).expand(rows, -1, -1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
