# SPDX-License-Identifier: Apache-2.0
"""Tests for SparseK's CPU rule (kernels/cpu_sparsek_rule.py, Numba) against its reference,
`scorer.attention_rule` with kernels="torch" (per-query k-th value and the exact sort-based
SPARSEK). The attended sets must be equal; the weights equal to float32 rounding of tau.
Scores are drawn so that every branch of the sweep is taken: prefixes within k (all
candidates, p = 1), the top-k with a free set, SPARSEK's flat case (a gap > 1 after the
k-th score), gaps of exactly 1 and many ties (rounded scores: the position breaks them)."""

import pytest
import torch

# imported as the engine imports it: Numba's on-disk cache records the module name
from vllm_sparse.kernels.cpu_sparsek_rule import cpu_sparsek_rule
from vllm_sparse.sparsek.scorer import attention_rule

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only kernel")

CASES = [  # (n, k, window, score scale, rounding step or None)
    (40, 5, 4, 1.0, None),         # short: most queries within k
    (300, 20, 16, 0.5, 0.25),      # many ties
    (300, 20, 16, 4.0, None),      # wide scores
    (200, 10, 8, 30.0, None),      # very wide: gaps > 1 after the k-th score (the flat case)
    (300, 20, 16, 3.0, 1.0),       # integer scores: gaps of exactly 1 at the k-th
    (1000, 100, 64, 1.0, None),
    (1000, 3, 0, 0.05, None),      # no window, narrow scores: large free sets
    (2000, 700, 700, 2.0, None),   # SparseK at a 70% budget, half of it window
]
QUERIES = ["last_block", "middle_block", "scattered", "one"]


def _scores(n, scale, step, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(3, n, generator=gen) * scale + torch.linspace(0, 1, n)   # a position trend
    return u if step is None else torch.round(u / step) * step


def _queries(kind, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "last_block":
        return torch.arange(max(0, n - 256), n)
    if kind == "middle_block":
        return torch.arange(n // 3, n // 3 + min(64, n // 3))
    if kind == "scattered":
        return torch.randint(0, n, (50,), generator=gen)     # unsorted, repeats
    return torch.tensor([n - 1])


@pytest.mark.parametrize("queries", QUERIES)
@pytest.mark.parametrize("n,k,window,scale,step", CASES)
def test_matches_reference(n, k, window, scale, step, queries):
    u = _scores(n, scale, step)
    pos = _queries(queries, n)
    attended_ref, weights_ref = attention_rule(u, k, window, pos, kernels="torch")
    attended, weights = cpu_sparsek_rule(u, k, window, pos)
    assert attended.shape == attended_ref.shape and weights.dtype == u.dtype
    assert torch.equal(attended, attended_ref)
    torch.testing.assert_close(weights, weights_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("queries", QUERIES)
@pytest.mark.parametrize("n,k,window,scale,step", CASES)
def test_compact_form(n, k, window, scale, step, queries):
    """compact=True: distinct columns per KV head that, scattered back, give the full form;
    for a block of consecutive queries at most k + W + 2Q of them (top-k sets of nested
    prefixes differ by at most one token per query)."""
    u = _scores(n, scale, step)
    pos = _queries(queries, n)
    attended_ref, weights_ref = attention_rule(u, k, window, pos, kernels="torch")
    columns, attended, weights = cpu_sparsek_rule(u, k, window, pos, compact=True)
    heads, num_queries, width = attended.shape
    assert columns.shape == (heads, width) and weights.shape == attended.shape
    assert all(len(set(row.tolist())) == width for row in columns)
    index = columns[:, None, :].expand(-1, num_queries, -1)
    full = torch.zeros_like(attended_ref).scatter_(2, index, attended)
    assert torch.equal(full, attended_ref)
    full_weights = torch.zeros_like(weights_ref).scatter_(2, index, weights)
    torch.testing.assert_close(full_weights, weights_ref, atol=1e-6, rtol=0)
    assert width == int(attended_ref.any(1).sum(-1).max())     # nothing unattended kept
    if queries.endswith("block"):
        assert width <= k + window + 2 * num_queries


@pytest.mark.parametrize("n,k,window,scale,step", CASES)
def test_rule_is_not_trivial(n, k, window, scale, step):
    """The cases reach the top-k (queries with more than k candidates, attending exactly
    k of them plus the window) and weights strictly between 0 and 1."""
    u = _scores(n, scale, step)
    pos = _queries("last_block", n)
    attended, weights = cpu_sparsek_rule(u, k, window, pos)
    counts = (pos - window + 1).clamp(min=0)
    many = counts > k
    assert many.any()
    attended_many = attended[:, many].sum(-1)
    window_sizes = (pos[many] + 1 - counts[many])
    assert torch.equal(attended_many, (k + window_sizes).expand_as(attended_many))
    if scale < 30.0:
        assert ((weights > 0) & (weights < 1)).any()


def test_float64_scores():
    u = _scores(500, 1.0, None).double()
    pos = torch.arange(300, 500)
    attended_ref, weights_ref = attention_rule(u, 40, 32, pos, kernels="torch")
    attended, weights = cpu_sparsek_rule(u, 40, 32, pos)
    assert weights.dtype == torch.float64 and torch.equal(attended, attended_ref)
    torch.testing.assert_close(weights, weights_ref, atol=1e-12, rtol=0)


def test_no_queries():
    attended, weights = cpu_sparsek_rule(_scores(100, 1.0, None), 10, 8,
                                         torch.zeros(0, dtype=torch.long))
    assert attended.shape == (3, 0, 100) and weights.shape == (3, 0, 100)


@pytest.mark.parametrize("k,window", [(0, 4), (-3, 4), (5, -1)])
def test_bad_budget(k, window):
    with pytest.raises(ValueError, match=f"k={k}, window={window}; allowed"):
        cpu_sparsek_rule(_scores(100, 1.0, None), k, window, torch.arange(100))


def test_no_gradient_through_numba():
    u = _scores(100, 1.0, None).requires_grad_()
    with pytest.raises(ValueError, match="kernels='numba' has no backward"):
        attention_rule(u, 10, 8, torch.arange(100), kernels="numba")
    with torch.no_grad():
        attended, _ = attention_rule(u, 10, 8, torch.arange(100), kernels="numba")
    assert torch.equal(attended, attention_rule(u.detach(), 10, 8, torch.arange(100),
                                                kernels="torch")[0])
