# SPDX-License-Identifier: Apache-2.0
"""Tests for Radar's fused CPU selection (kernels/cpu_radar_select.py, Numba).

Checked against the policy's torch path on the same summaries: `selection_sizes` for the
budget split, the page scores' pure-torch reference (`radar_page_scores_ref`), and
`top_segment_pages`. Segments whose reference scores tie within float32 rounding may rank
either way, so pages are compared exactly only where the kept segments are separated from
the rest; everywhere the kept set must be a top-k set of the reference scores.
(`tests/unit/test_radar_policy.py` also checks the policy on this kernel against the plain
oracle recomputed from the keys.)
"""

import pytest
import torch
from paged_inputs import BLOCK_SIZE, HEAD_DIM, strided_cache  # noqa: I001 (first: sys.path)

# imported as the engine imports it: Numba's on-disk cache records the module name
from vllm_sparse.kernels.cpu_radar_select import cpu_radar_select  # noqa: E402
from vllm_sparse.policies.radar import selection_sizes, top_segment_pages  # noqa: E402
from kernels.radar_score import radar_page_scores_ref, radar_summarize_pages_ref  # noqa: E402

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only kernel"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered in log")]
SCALE = HEAD_DIM ** -0.5
GQA = [(4, 4), (9, 3), (5, 1)]
# contexts: within sinks + window, one page, a few segments, many segments of several pages
SEQ_LENS = [30, 70, 500, 1500, 4100]
NUM_BLOCKS = 400
SIZE_NAMES = ("sinks", "window")


def _state(hkv, n, center, seed=0):
    """Summaries, page maxima and means of random keys (shifted per block and head, so that
    the q . mean term matters), and a random block table covering SEQ_LENS."""
    gen = torch.Generator().manual_seed(seed)
    kv_cache = strided_cache(NUM_BLOCKS, hkv, torch.float32, "padded", gen,
                             view_on_device=False)[1]
    kv_cache = kv_cache + torch.randn(NUM_BLOCKS, hkv, 1, 2 * HEAD_DIM, generator=gen)
    projection = torch.randn(HEAD_DIM, n, generator=gen)
    summaries = torch.zeros(NUM_BLOCKS, hkv, 2 * n)
    page_max = torch.full((NUM_BLOCKS, hkv), float("-inf"))
    means = torch.zeros(NUM_BLOCKS, hkv, HEAD_DIM) if center else None
    width = -(-max(SEQ_LENS) // BLOCK_SIZE)
    table = torch.stack([torch.randperm(NUM_BLOCKS, generator=gen)[:width] for _ in SEQ_LENS])
    unwritten = table[3, :3]      # never summarised: -inf logits
    written = torch.tensor([b for b in range(NUM_BLOCKS) if b not in unwritten.tolist()])
    radar_summarize_pages_ref(kv_cache, written, projection, SCALE, summaries, page_max,
                              means=means)
    return projection, summaries, page_max, means, table


def _reference(query, projection, summaries, page_max, means, table, seq_lens, budgets, **cfg):
    sizes = selection_sizes(seq_lens, budgets, cfg["num_sink_tokens"], cfg["local_window"],
                            cfg["aspect_ratio"], BLOCK_SIZE)
    shares = radar_page_scores_ref(query, summaries, page_max, table, sizes.num_pages,
                                   projection, SCALE, means=means)
    return sizes, shares


def _segment_scores(shares, seg_pages, num_segments):
    scores = torch.zeros(num_segments)
    scores.index_add_(0, torch.arange(shares.shape[0]) // seg_pages, shares)
    return scores


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("n", [16, 128])
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("budget", [0.25, 150])
def test_matches_torch_selection(hq, hkv, n, center, budget):
    projection, summaries, page_max, means, table = _state(hkv, n, center, seed=hq + n)
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(len(SEQ_LENS), 2 * hq, HEAD_DIM, generator=gen)[:, ::2]   # strided
    seq_lens = torch.tensor(SEQ_LENS)
    budgets = (seq_lens * budget).long() if isinstance(budget, float) \
        else torch.full_like(seq_lens, budget)
    cfg = dict(num_sink_tokens=4, local_window=64, aspect_ratio=1.0)
    pages, sinks, window = cpu_radar_select(query, summaries, page_max, means, table, seq_lens,
                                            budgets, projection, SCALE, block_size=BLOCK_SIZE,
                                            **cfg)
    sizes, shares = _reference(query, projection, summaries, page_max, means, table, seq_lens,
                               budgets, **cfg)
    assert torch.equal(sinks, sizes.sinks) and torch.equal(window, sizes.window)
    expected = top_segment_pages(shares, sizes)
    assert pages.shape == expected.shape and pages.dtype == torch.int64
    assert int(sizes.keep.max()) > 1, "the case must keep several segments"
    exact = 0
    for i in range(len(SEQ_LENS)):
        keep, c = int(sizes.keep[i]), int(sizes.seg_pages[i])
        for h in range(hkv):
            if keep == 0:
                assert torch.all(pages[i, h] == -1)
                continue
            scores = _segment_scores(shares[i, h, :int(sizes.num_pages[i])], c,
                                     int(sizes.num_segments[i]))
            kept = pages[i, h][pages[i, h] >= 0] // c
            kept_segments = kept.unique()
            assert len(kept_segments) == keep
            others = torch.ones_like(scores, dtype=torch.bool)
            others[kept_segments] = False
            margin = scores[kept_segments].min() - (scores[others].max() if others.any() else -1)
            assert margin >= -1e-6, f"row {i} head {h}: a better segment was left out"
            if margin > 1e-5:
                assert torch.equal(pages[i, h].sort().values, expected[i, h].sort().values)
                exact += 1
    assert exact >= hkv * 2, "too few rows compared exactly"


def test_nothing_to_select():
    projection, summaries, page_max, means, table = _state(2, 16, True)
    query = torch.randn(2, 4, HEAD_DIM)
    seq_lens, budgets = torch.tensor([500, 40]), torch.tensor([60, 60])
    pages, sinks, window = cpu_radar_select(query, summaries, page_max, means, table[:2],
                                            seq_lens, budgets, projection, SCALE,
                                            num_sink_tokens=4, local_window=64,
                                            aspect_ratio=1.0, block_size=BLOCK_SIZE)
    assert pages.shape == (2, 2, 0) and sinks.tolist() == [4, 4] and window.tolist() == [56, 56]
    empty = cpu_radar_select(query[:0], summaries, page_max, means, table[:0], seq_lens[:0],
                             budgets[:0], projection, SCALE, num_sink_tokens=4, local_window=64,
                             aspect_ratio=1.0, block_size=BLOCK_SIZE)
    assert empty[0].shape == (0, 2, 0) and empty[1].numel() == 0


def test_bad_inputs_are_named():
    projection, summaries, page_max, means, table = _state(2, 16, True)
    args = (summaries, page_max, means, table[:1], torch.tensor([500]), torch.tensor([100]))
    cfg = dict(num_sink_tokens=4, local_window=64, aspect_ratio=1.0, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="Hq=5 is not a multiple of Hkv=2"):
        cpu_radar_select(torch.randn(1, 5, HEAD_DIM), *args, projection, SCALE, **cfg)
    with pytest.raises(ValueError, match="does not match head size"):
        cpu_radar_select(torch.randn(1, 4, HEAD_DIM), *args, projection[:8], SCALE, **cfg)
