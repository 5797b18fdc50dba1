# SPDX-License-Identifier: Apache-2.0
"""Radar's paged, incremental selection equals the plain oracle recomputed from the keys."""

import pytest
import torch

from tests.radar_oracle import radar_mask
from vllm_sparse import reference
from vllm_sparse.config import RadarConfig
from vllm_sparse.policies.base import DecodeQueries
from vllm_sparse.policies.radar import RadarPolicy, segment_pages

BLOCK = 16
HEAD = 32
# (Hq, Hkv): plain, GQA with a group of 3 (SmolLM2), group of 5 (not a power of two)
HEADS = [(2, 2), (6, 2), (5, 1)]
# contexts: shorter than sinks+window, around page edges, long enough for several segments
LENGTHS = [40, 96, 97, 300, 1500]


def _paged(keys_values, num_blocks, generator):
    """Write per-sequence K/V [T, Hkv, 2D] into a strided cache through random block tables."""
    hkv = keys_values[0].shape[1]
    storage = torch.zeros(num_blocks, hkv + 1, BLOCK, 2 * HEAD + 4)
    kv_cache = storage[:, 1:, :, 2:2 + 2 * HEAD]                    # non-contiguous view
    perm = torch.randperm(num_blocks, generator=generator)
    max_pages = max(-(-kv.shape[0] // BLOCK) for kv in keys_values)
    table = torch.zeros(len(keys_values), max_pages, dtype=torch.int32)
    used = 0
    for i, kv in enumerate(keys_values):
        pages = -(-kv.shape[0] // BLOCK)
        table[i, :pages] = perm[used:used + pages].int()
        used += pages
        pos = torch.arange(kv.shape[0])
        slots = table[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
        reference.write_kv(kv_cache, kv[..., :HEAD], kv[..., HEAD:], slots)
    return kv_cache, table


@pytest.mark.parametrize("kernels", ["torch", "numba"])   # "numba": kernels/cpu_radar_select.py
@pytest.mark.parametrize("center_keys", [True, False])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("budget", [64, 200, 0.3])
def test_selection_equals_oracle(heads, budget, center_keys, kernels):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(hq * 31 + hkv)
    config = RadarConfig(projection_dim=64, aspect_ratio=1.0, num_sink_tokens=2, local_window=24,
                         center_keys=center_keys)
    kvs = [torch.randn(n, hkv, 2 * HEAD, generator=gen) for n in LENGTHS]
    kv_cache, table = _paged(kvs, 256, gen)
    policy = RadarPolicy(config, HEAD, scale=HEAD ** -0.5, kernels=kernels)
    # pages are summarised as their last slot is written; replay the writes step by step
    slots = torch.cat([table[i, torch.arange(kv.shape[0]) // BLOCK].long() * BLOCK
                       + torch.arange(kv.shape[0]) % BLOCK for i, kv in enumerate(kvs)])
    for chunk in slots.split(37):
        policy.observe_write(kv_cache, chunk)
    query = torch.randn(len(LENGTHS), hq, HEAD, generator=gen)
    seq_lens = torch.tensor(LENGTHS)
    budgets = (torch.full_like(seq_lens, budget) if isinstance(budget, int)
               else (seq_lens * budget).floor().long())
    selection = policy.select(DecodeQueries(query, seq_lens, table, budgets), kv_cache)
    mask = reference.selection_mask(selection.pages, seq_lens, selection.num_sink_tokens,
                                    selection.local_window, BLOCK, max(LENGTHS))
    for i, n in enumerate(LENGTHS):
        b = int(budgets[i])
        expected = radar_mask(query[i], kvs[i][..., :HEAD].transpose(0, 1), config, BLOCK,
                              b if b < n else n, HEAD ** -0.5) if b < n else None
        got = mask[i, :, :n]
        if expected is None:  # within budget: the backend attends densely, not via select
            continue
        assert torch.equal(got, expected), f"row {i} (T={n}) differs from the oracle"
        assert got.sum(-1).max() <= b, "attended more tokens than the budget"
        if n >= 300:
            assert got.sum(-1).max() < n, "the sparse path must attend fewer tokens than the context"


def test_segments_grow_only_when_the_context_doubles():
    lens = torch.tensor([1000, 1023, 1024, 2047, 4096, 131072])
    pages = segment_pages(lens, aspect_ratio=2.0, block_size=16)
    assert pages.tolist() == [1, 1, 1, 1, 2, 11]


def test_page_gather_reads_the_same_set():
    """The torch decode reads whole pages; their valid tokens are exactly the selection."""
    gen = torch.Generator().manual_seed(3)
    seq_lens = torch.tensor([1, 5, 64, 100, 200, 31])
    sinks = torch.tensor([0, 3, 3, 1, 17, 40])
    window = torch.tensor([0, 2, 20, 33, 5, 0])
    pages = torch.full((6, 2, 4), -1)
    for i in range(6):
        for h in range(2):
            chosen = torch.randperm(14, generator=gen)[: int(torch.randint(0, 5, (1,), generator=gen))]
            pages[i, h, : chosen.numel()] = chosen
    mask = reference.selection_mask(pages, seq_lens, sinks, window, 16, 224)
    ids, valid = reference.selection_pages(pages, seq_lens, sinks, window, 16)
    tokens = (ids[..., None] * 16 + torch.arange(16)).flatten(2)
    for i in range(6):
        for h in range(2):
            got = tokens[i, h][valid[i, h]]
            assert got.unique().numel() == got.numel(), "a token was read twice"
            assert sorted(got.tolist()) == mask[i, h].nonzero().squeeze(1).tolist()
