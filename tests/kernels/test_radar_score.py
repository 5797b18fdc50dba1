# SPDX-License-Identifier: Apache-2.0
"""Tests for the Radar summary and page-score kernels (kernels/radar_score.py, Triton; the CPU
path's fused Numba selection, kernels/cpu_radar_select.py, has its own test file).

Each kernel is checked against its pure-torch reference and, where vLLM is importable
(not on the bare GPU machine), against `vllm_sparse.policies.radar.RadarPolicy` itself,
with centred keys (`means`, RadarConfig.center_keys, the default) and without (the paper's).
"""

import math

import pytest
import torch
from paged_inputs import (  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
    BLOCK_SIZE, DEVICE, HEAD_DIM, strided_cache,
)

from kernels.radar_score import (  # noqa: E402
    radar_page_scores,
    radar_page_scores_ref,
    radar_summarize_pages,
    radar_summarize_pages_ref,
)


# log(0) of never-summarised pages is part of the semantics (-inf logits); numpy warns under the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
SCALE = HEAD_DIM ** -0.5
# Group sizes 1, 3 and 5: equal heads, a non-power-of-two group and MQA-like 5:1.
GQA = [(4, 4), (6, 2), (5, 1)]
# RadarConfig's default n = 128, and a smaller n = 64 (one vs. two page tiles by default).
PROJ_DIMS = [64, 128]
# Keys and queries are upcast to fp32 before any math, so fp16 inputs get fp32 tolerances;
# bf16 is covered by the GPU test only (the brief for these tests: no bf16 under the interpreter).
DTYPES = [torch.float32, torch.float16]
SUMMARY_TOL = dict(atol=1e-6, rtol=1e-4)  # sums of exp of fp32 dot products (summation order differs)
SHARE_TOL = dict(atol=2e-6, rtol=1e-4)
# Candidate pages per row: an empty row; one page (share = group size); two pages that were
# never summarised (all logits -inf: zero shares); one unsummarised page among nine; 37 pages
# (two page tiles at n = 128).
NUM_PAGES = [0, 1, 2, 9, 37]
NUM_BLOCKS = 100  # physical blocks, more than the rows use; shuffled block tables
# Centred keys (page means, RadarConfig.center_keys=True, the default) and the paper's estimator.
CENTER = [True, False]
# (dtype, center) of the kernel tests: the paper's estimator (its code path has no dtype-specific
# part beside the shared key/query upcast) runs in fp32 only, to keep the file fast under the interpreter.
DTYPE_CENTER = [pytest.param(dt, c, id=f"{str(dt)[6:]}-{'centred' if c else 'paper'}")
                for dt in DTYPES for c in CENTER if c or dt == torch.float32]
MEAN_TOL = dict(atol=1e-6, rtol=1e-5)  # fp32 mean of block_size keys (summation order differs)


def _make_cache(num_blocks, hkv, dtype, *, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, layout="padded", seed=0):
    """A *strided* random kv_cache view [num_blocks, Hkv, block_size, 2D]."""
    gen = torch.Generator().manual_seed(seed)
    return strided_cache(num_blocks, hkv, dtype, layout, gen, head_dim=head_dim, block_size=block_size,
                         view_on_device=False)[1]


def _projection(head_dim, n, seed=1):
    return torch.randn(head_dim, n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _empty_state(num_blocks, hkv, n):
    return (torch.zeros(num_blocks, hkv, 2 * n, device=DEVICE),
            torch.full((num_blocks, hkv), float("-inf"), device=DEVICE))


def _empty_means(num_blocks, hkv, center, head_dim=HEAD_DIM):
    """Page means as `RadarPolicy._ensure_state` allocates them, or None (paper's estimator)."""
    return torch.zeros(num_blocks, hkv, head_dim, device=DEVICE) if center else None


def _block_table(num_pages, num_blocks, *, extra=3, seed=2, dtype=torch.int32):
    """[N, max(num_pages) + extra] random blocks, distinct within a row; -1 past each row's pages
    (the kernel must not read them)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(num_pages) + extra
    table = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in num_pages])
    table = table.masked_fill(torch.arange(width) >= torch.tensor(num_pages)[:, None], -1)
    return table.to(dtype).to(DEVICE)


def _policy(n, center, head_dim=HEAD_DIM, scale=SCALE):
    """A RadarPolicy, or None where vLLM (imported by vllm_sparse) is missing."""
    try:
        from vllm_sparse.config import RadarConfig
        from vllm_sparse.policies.radar import RadarPolicy
    except ImportError:
        return None
    return RadarPolicy(RadarConfig(projection_dim=n, center_keys=center), head_size=head_dim, scale=scale)


@pytest.mark.parametrize("dtype,center", DTYPE_CENTER)
@pytest.mark.parametrize("n", PROJ_DIMS)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_summarize_pages(hq, hkv, n, dtype, center):
    """Summaries (and page means) of full pages equal `observe_write`'s; other blocks stay untouched."""
    num_blocks = 24
    kv_cache = _make_cache(num_blocks, hkv, dtype, layout="permuted" if hkv == 2 else "padded")
    gen = torch.Generator().manual_seed(3)
    full = torch.randperm(num_blocks, generator=gen)[:10].tolist()
    policy = _policy(n, center)
    projection = policy.projection.to(DEVICE) if policy else _projection(HEAD_DIM, n)
    # the step's slots: last slots of `full`, other slots of other blocks, padding
    partial = [b * BLOCK_SIZE + 5 for b in range(num_blocks) if b not in full][:4]
    slots = torch.tensor([b * BLOCK_SIZE + BLOCK_SIZE - 1 for b in full] + partial + [-1], device=DEVICE)
    blocks = torch.tensor(full + [-1, full[0]], device=DEVICE)  # padding and a duplicate are fine

    summaries, page_max = _empty_state(num_blocks, hkv, n)
    means = _empty_means(num_blocks, hkv, center)
    radar_summarize_pages(kv_cache, blocks, projection, SCALE, summaries, page_max, means=means)
    ref_s, ref_m = _empty_state(num_blocks, hkv, n)
    ref_mu = _empty_means(num_blocks, hkv, center)
    radar_summarize_pages_ref(kv_cache, blocks, projection, SCALE, ref_s, ref_m, means=ref_mu)
    torch.testing.assert_close(summaries, ref_s, **SUMMARY_TOL)
    torch.testing.assert_close(page_max, ref_m, **SUMMARY_TOL)
    untouched = torch.ones(num_blocks, dtype=torch.bool)
    untouched[full] = False
    assert torch.all(summaries[untouched] == 0) and torch.all(page_max[untouched] == float("-inf"))
    if center:
        torch.testing.assert_close(means, ref_mu, **MEAN_TOL)
        assert torch.all(means[untouched] == 0)
    if policy is not None:
        policy.observe_write(kv_cache, slots)
        torch.testing.assert_close(summaries, policy.summaries, **SUMMARY_TOL)
        torch.testing.assert_close(page_max, policy.page_max, **SUMMARY_TOL)
        assert (policy.means is None) == (not center)
        if center:
            torch.testing.assert_close(means, policy.means, **MEAN_TOL)


@pytest.mark.parametrize("dtype,center", DTYPE_CENTER)
@pytest.mark.parametrize("n", PROJ_DIMS)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_page_scores(hq, hkv, n, dtype, center):
    """Shares equal `RadarPolicy.page_scores` on the same summaries (and means), queries and block table."""
    block_table = _block_table(NUM_PAGES, NUM_BLOCKS)
    gen = torch.Generator().manual_seed(4)
    projection = _projection(HEAD_DIM, n)
    # summaries of random keys (any values of the right form would do): all blocks but a few
    summaries, page_max = _empty_state(NUM_BLOCKS, hkv, n)
    means = _empty_means(NUM_BLOCKS, hkv, center)  # unwritten pages keep mean 0, like the policy's
    unwritten = block_table[2, :2].tolist() + block_table[3, 4:5].tolist()
    written = torch.tensor([b for b in range(NUM_BLOCKS) if b not in unwritten], device=DEVICE)
    # keys with a per-(block, head) offset, so that the q . mean term matters
    kv_cache = _make_cache(NUM_BLOCKS, hkv, torch.float32, seed=5)
    kv_cache = kv_cache + torch.randn(NUM_BLOCKS, hkv, 1, 2 * HEAD_DIM, generator=gen).to(DEVICE)
    radar_summarize_pages_ref(kv_cache, written, projection, SCALE, summaries, page_max, means=means)
    query = torch.randn(len(NUM_PAGES), hq, HEAD_DIM + 8, generator=gen).to(dtype).to(DEVICE)[..., :HEAD_DIM]
    num_pages = torch.tensor(NUM_PAGES, device=DEVICE)

    args = (query, summaries, page_max, block_table, num_pages, projection, SCALE)
    shares = radar_page_scores(*args, means=means)
    assert shares.shape == (len(NUM_PAGES), hkv, max(NUM_PAGES)) and shares.dtype == torch.float32
    torch.testing.assert_close(shares, radar_page_scores_ref(*args, means=means), **SHARE_TOL)
    group, row_sums = hq // hkv, shares.sum(-1)
    torch.testing.assert_close(row_sums[[1, 3, 4]], torch.full_like(row_sums[[1, 3, 4]], group))
    assert torch.all(shares[1, :, 0] == group) and torch.all(shares[[0, 2]] == 0)
    assert torch.all(shares[3, :, 4] == 0) and torch.all(shares[:4, :, 9:] == 0)

    policy = _policy(n, center)
    if policy is not None:
        from vllm_sparse.policies.base import DecodeQueries

        policy.projection, policy.summaries, policy.page_max = projection, summaries, page_max
        policy.means = means
        rows = DecodeQueries(query, num_pages * BLOCK_SIZE + 64, block_table, num_pages)
        torch.testing.assert_close(shares, policy.page_scores(rows, num_pages), **SHARE_TOL)


@pytest.mark.parametrize("num_splits", [1, 2, 5])  # row 0 has 3 page tiles: 5 leaves splits empty
def test_splits_and_max_pages(num_splits):
    """Page tiles split over programs (some with no tiles) merge to the same shares; `max_pages`
    wider than the rows pads with zeros and needs no host sync (centred keys, the default)."""
    hq, hkv, n, num_pages = 6, 2, 64, [40, 17, 0]
    block_table = _block_table(num_pages, NUM_BLOCKS, extra=5)
    projection = _projection(HEAD_DIM, n)
    summaries, page_max = _empty_state(NUM_BLOCKS, hkv, n)
    means = _empty_means(NUM_BLOCKS, hkv, True)
    radar_summarize_pages_ref(_make_cache(NUM_BLOCKS, hkv, torch.float32, seed=6) + 0.5,
                              torch.arange(NUM_BLOCKS, device=DEVICE), projection, SCALE, summaries, page_max,
                              means=means)
    query = torch.randn(3, hq, HEAD_DIM, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    args = (query, summaries, page_max, block_table, torch.tensor(num_pages, device=DEVICE), projection, SCALE)
    ref = radar_page_scores_ref(*args, means=means)
    shares = radar_page_scores(*args, means=means, num_splits=num_splits, block_p=16)
    torch.testing.assert_close(shares, ref, **SHARE_TOL)
    wide = radar_page_scores(*args, max_pages=block_table.shape[1], means=means, num_splits=num_splits, block_p=16)
    assert wide.shape == (3, hkv, 45) and torch.all(wide[..., 40:] == 0)
    torch.testing.assert_close(wide[..., :40], ref, **SHARE_TOL)


@pytest.mark.parametrize("center", CENTER)
def test_odd_shapes(center):
    """Head size 80, block size 24 (padded page rows in the mean), n = 48 in three feature
    tiles, 3 KV heads over two programs, group 3, int64 indices, strided summaries / page_max /
    means / query, scale 0.05."""
    hq, hkv, d, bs, n, scale, num_blocks = 9, 3, 80, 24, 48, 0.05, 16
    kv_cache = _make_cache(num_blocks, hkv, torch.float16, head_dim=d, block_size=bs, layout="permuted")
    projection = _projection(d, n)
    s_buf = torch.full((num_blocks, hkv + 1, 2 * n + 3), 7.0, device=DEVICE)
    m_buf = torch.full((hkv + 2, num_blocks), 7.0, device=DEVICE)
    summaries, page_max = s_buf[:, 1:, 2:2 + 2 * n], m_buf[1:1 + hkv].t()
    mu_buf = torch.full((hkv, num_blocks, d + 5), 7.0, device=DEVICE)  # [Hkv, blocks, D] memory order
    means = mu_buf[..., 1:1 + d].transpose(0, 1) if center else None
    blocks = torch.arange(num_blocks - 1, -1, -1, device=DEVICE)  # int64, all blocks
    radar_summarize_pages(kv_cache, blocks, projection, scale, summaries, page_max, means=means, block_f=16,
                          heads_per_program=2)
    ref_s, ref_m = _empty_state(num_blocks, hkv, n)
    ref_mu = _empty_means(num_blocks, hkv, center, head_dim=d)
    radar_summarize_pages_ref(kv_cache, blocks, projection, scale, ref_s, ref_m, means=ref_mu)
    torch.testing.assert_close(summaries, ref_s, **SUMMARY_TOL)
    torch.testing.assert_close(page_max, ref_m, **SUMMARY_TOL)
    assert torch.all(s_buf[:, 0] == 7) and torch.all(s_buf[..., :2] == 7) and torch.all(s_buf[..., 2 + 2 * n:] == 7)
    assert torch.all(m_buf[0] == 7) and torch.all(m_buf[1 + hkv:] == 7)
    if center:
        torch.testing.assert_close(means, ref_mu, **MEAN_TOL)
        assert torch.all(mu_buf[..., 0] == 7) and torch.all(mu_buf[..., 1 + d:] == 7)
    else:
        assert torch.all(mu_buf == 7)

    num_pages = [11, 1, 6]
    block_table = _block_table(num_pages, num_blocks, dtype=torch.int64)
    query = torch.randn(3, 2 * hq, d, generator=torch.Generator().manual_seed(8)).to(torch.float16).to(DEVICE)[:, ::2]
    args = (query, summaries, page_max, block_table, torch.tensor(num_pages, dtype=torch.int32, device=DEVICE),
            projection, scale)
    ref = radar_page_scores_ref(*args, means=means)
    torch.testing.assert_close(radar_page_scores(*args, means=means), ref, **SHARE_TOL)


def test_empty_inputs():
    """No blocks (or only padding) writes nothing; no rows or no pages give empty shares."""
    hkv, n = 2, 64
    kv_cache, projection = _make_cache(8, hkv, torch.float32), _projection(HEAD_DIM, n)
    summaries, page_max = _empty_state(8, hkv, n)
    for blocks in (torch.empty(0, dtype=torch.int64), torch.full((3,), -1, dtype=torch.int32)):
        radar_summarize_pages(kv_cache, blocks.to(DEVICE), projection, SCALE, summaries, page_max)
    assert torch.all(summaries == 0) and torch.all(page_max == float("-inf"))
    query = torch.randn(2, 4, HEAD_DIM, device=DEVICE)
    table = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    shares = radar_page_scores(query, summaries, page_max, table, torch.zeros(2, dtype=torch.int32, device=DEVICE),
                               projection, SCALE)
    assert shares.shape == (2, hkv, 0)
    shares = radar_page_scores(query[:0], summaries, page_max, table[:0], torch.zeros(0, dtype=torch.int32,
                               device=DEVICE), projection, SCALE, max_pages=3)
    assert shares.shape == (0, hkv, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("center", CENTER)
def test_gpu_llama8b_128k(center):
    """Llama-3.1-8B (Hq 32, Hkv 8, D 128, block 16), bf16 keys and queries, n = 128, a 128K
    context (8192 pages), with element offsets past 2^31 in the cache and the summaries;
    centred (strided means) and the paper's estimator."""
    hq, hkv, d, n, num_pages = 32, 8, 128, 128, [8192, 5000, 1]
    num_blocks = 70_000  # 70000 * 8 * 16 * 256 cache elements > 2^31
    gen = torch.Generator(device="cuda").manual_seed(9)
    kv_cache = torch.randn(num_blocks, hkv, BLOCK_SIZE, 2 * d, device="cuda", dtype=torch.bfloat16, generator=gen)
    s_buf = torch.zeros(num_blocks, hkv, 4096, device="cuda")  # block stride 32768: offsets > 2^31
    summaries, page_max = s_buf[..., : 2 * n], torch.full((num_blocks, hkv), float("-inf"), device="cuda")
    used = num_blocks - 1 - torch.randperm(20_000, device="cuda", generator=gen)[: sum(num_pages)]
    block_table = torch.full((3, 8192), -1, dtype=torch.int32, device="cuda")
    for i, (start, count) in enumerate(zip([0, 8192, 13192], num_pages)):
        block_table[i, :count] = used[start:start + count].int()
    projection = torch.randn(d, n, device="cuda", generator=gen)
    scale = d ** -0.5
    # centred: means [num_blocks, Hkv, D], a strided view inside a wider buffer
    means = torch.zeros(num_blocks, hkv, 256, device="cuda")[..., 64:64 + d] if center else None
    radar_summarize_pages(kv_cache, used, projection, scale, summaries, page_max, means=means)
    ref_s, ref_m = torch.zeros(num_blocks, hkv, 2 * n, device="cuda"), torch.full_like(page_max, float("-inf"))
    ref_mu = torch.zeros(num_blocks, hkv, d, device="cuda") if center else None
    radar_summarize_pages_ref(kv_cache, used, projection, scale, ref_s, ref_m, means=ref_mu)
    torch.testing.assert_close(summaries[used], ref_s[used], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(page_max, ref_m, atol=1e-4, rtol=1e-5)
    if center:
        torch.testing.assert_close(means, ref_mu, atol=1e-6, rtol=1e-5)

    query = torch.randn(3, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    args = (query, summaries, page_max, block_table, torch.tensor(num_pages, device="cuda"), projection, scale)
    ref = radar_page_scores_ref(*args, means=means)
    for num_splits in (None, 1, 7):
        shares = radar_page_scores(*args, means=means, num_splits=num_splits)
        torch.testing.assert_close(shares, ref, atol=1e-7, rtol=1e-3)
        torch.testing.assert_close(shares.sum(-1), torch.full((3, hkv), hq / hkv, device="cuda"), atol=0, rtol=1e-4)
    assert math.isclose(float(shares[2, :, 0].min()), hq / hkv)
