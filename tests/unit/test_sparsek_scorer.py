# SPDX-License-Identifier: Apache-2.0
"""The SparseK contract (vllm_sparse/sparsek/scorer.py): file format, scores, the attended
set and value weights against naive per-query loops, and eviction monotonicity."""

import pytest
import torch

from vllm_sparse.sparsek.scorer import (FORMAT, SparseKScorer, attention_rule, evictable, scores,
                                        selected, value_weights)

# (k, window): no window, k = 1 (sparsemax), k larger than most candidate sets, window > n
RULES = [(1, 0), (2, 3), (3, 1), (5, 2), (7, 0), (4, 40)]


# ---- naive references (independent of the module) ----

def naive_top(u_row: list[float], k: int, window: int, pos: int) -> set[int]:
    """Top-k candidates j <= pos - window by (u descending, older first); all if <= k."""
    cand = list(range(max(0, pos - window + 1)))
    return set(sorted(cand, key=lambda j: (-u_row[j], j))[:k])


def naive_p(z: list[float], k: int) -> list[float]:
    """SPARSEK by bisection in float64: sum clip(z - t, 0, 1) = k (all ones if len(z) <= k)."""
    if len(z) <= k:
        return [1.0] * len(z)
    lo, hi = min(z) - 1.0, max(z)
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(max(x - mid, 0.0), 1.0) for x in z) >= k:
            lo = mid
        else:
            hi = mid
    return [min(max(x - (lo + hi) / 2, 0.0), 1.0) for x in z]


def random_scores(heads: int, n: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties, gaps of exactly 1 (flat SPARSEK cases)
        return torch.randint(0, 4, (heads, n), generator=g).double()
    return torch.randn(heads, n, generator=g, dtype=torch.float64)


# ---- format ----

def test_save_load_roundtrip(tmp_path):
    s = SparseKScorer(torch.randn(2, 3, 8), torch.randn(2, 3), torch.randn(2, 3), k=64, window=16,
                      meta={"steps": 5})
    s.save(tmp_path / "s.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["format"] == FORMAT and header["k"] == "64" and header["window"] == "16"
    t = SparseKScorer.load(tmp_path / "s.safetensors")
    assert (t.k, t.window, t.meta) == (64, 16, {"steps": 5})
    assert (t.num_layers, t.num_kv_heads, t.head_size) == (2, 3, 4)
    for name in ("weight", "bias", "slope"):
        assert torch.equal(getattr(t, name), getattr(s, name))


@pytest.mark.parametrize("kwargs, message", [
    ({"weight": torch.zeros(2, 3, 7)}, "2\\*head_size"),
    ({"weight": torch.zeros(2, 8)}, "2\\*head_size"),
    ({"bias": torch.zeros(2, 4)}, "bias \\(2, 4\\)"),
    ({"slope": torch.zeros(3)}, "slope \\(3,\\)"),
    ({"k": 0}, "k=0; allowed: integers >= 1"),
    ({"k": -2}, "k=-2"),
    ({"k": 2.5}, "k=2.5"),
    ({"window": -1}, "window=-1; allowed: integers >= 0"),
])
def test_invalid_scorer(kwargs, message):
    args = {"weight": torch.zeros(2, 3, 8), "bias": torch.zeros(2, 3), "slope": torch.zeros(2, 3),
            "k": 4, "window": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        SparseKScorer(**args)


def test_load_rejects_other_format(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1)}, str(tmp_path / "x.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="format 'other'"):
        SparseKScorer.load(tmp_path / "x.safetensors")


# ---- scores ----

def test_scores_formula():
    key, value = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    w, b, slope = torch.randn(2, 8), torch.randn(2), torch.randn(2)
    pos = torch.arange(10, 15)
    u = scores(key, value, w, b, slope, pos)
    for h in range(2):
        for j in range(5):
            ref = torch.cat([key[h, j], value[h, j]]) @ w[h] + b[h] + slope[h] * pos[j]
            assert torch.allclose(u[h, j], ref, atol=1e-5)
    with pytest.raises(ValueError, match="weight \\(2, 6\\)"):
        scores(key, value, torch.randn(2, 6), b, slope, pos)


def test_zero_scorer_slope_is_streaming():
    """slope <= -1: the oldest k candidates with p = 1 exactly (StreamingLLM sinks + window)."""
    s = SparseKScorer.zeros(1, 1, 2, k=2, window=3, slope=-1.0)
    w, b, slope = s.layer(0)
    u = scores(torch.randn(1, 10, 2), torch.randn(1, 10, 2), w, b, slope, torch.arange(10))
    att, wts = attention_rule(u, 2, 3, torch.tensor([9]))
    assert att[0, 0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert wts[0, 0][att[0, 0]].tolist() == [1.0] * 5


# ---- attended set and value weights ----

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k, window", RULES)
def test_selected_and_weights_match_naive(k, window, ties):
    heads, n = 2, 14
    u = random_scores(heads, n, seed=k * 31 + window, ties=ties)
    pos = torch.arange(n)
    att, wts = attention_rule(u, k, window, pos)
    assert torch.equal(att, selected(u, k, window, pos))
    assert torch.equal(wts, value_weights(u, k, window, pos))
    for h in range(heads):
        row = u[h].tolist()
        for i in range(n):
            top = naive_top(row, k, window, i)
            win = set(range(max(0, i - window + 1), i + 1))
            assert set(att[h, i].nonzero().flatten().tolist()) == top | win, (h, i)
            cand = list(range(max(0, i - window + 1)))
            p = naive_p([row[j] for j in cand], k)
            expect = [p[j] if j in top else 1.0 if j in win else 0.0 for j in range(n)]
            assert torch.allclose(wts[h, i], torch.tensor(expect, dtype=wts.dtype), atol=1e-9), (h, i)


def test_query_subset_and_float32():
    u = random_scores(3, 20, seed=1, ties=False).float()
    pos = torch.tensor([19, 4, 11])
    att, wts = attention_rule(u, 3, 2, pos)
    full_att, full_wts = attention_rule(u, 3, 2, torch.arange(20))
    assert torch.equal(att, full_att[:, pos]) and torch.equal(wts, full_wts[:, pos])
    assert wts.dtype == torch.float32
    # sum of p over the top-k is at most k; every top-k entry has p > 0
    top = att & (torch.arange(20) <= pos[:, None] - 2)
    assert (torch.where(top, wts, 0).sum(-1) <= 3 + 1e-5).all() and (wts[top] > 0).all()


# ---- eviction ----

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k, window", RULES)
def test_evicted_tokens_never_return(k, window, ties):
    """A token evictable at next_pos is attended by no query at a position >= next_pos, and
    exactly min(k, c) candidates stay (top-k and eviction share the tie-break)."""
    n = 40
    u = random_scores(2, n, seed=100 + k * 7 + window, ties=ties)
    att = selected(u, k, window, torch.arange(n))                                    # [H, Q, n]
    for next_pos in range(n):
        ev = evictable(u, k, window, next_pos)
        later = att[:, next_pos:].any(dim=1)
        assert not (ev & later).any(), next_pos
        cand = max(0, next_pos - window + 1)
        assert (cand - ev.sum(-1) == min(k, cand)).all(), next_pos
        if next_pos:
            assert (ev | ~evictable(u, k, window, next_pos - 1)).all()               # evicted stays so


def test_evictable_needs_all_candidates():
    with pytest.raises(ValueError, match="next_pos=10 with window=2 needs at least 9"):
        evictable(torch.zeros(1, 8), 2, 2, 10)


def test_tau_never_decreases_and_p_needs_only_live_scores():
    """Decode needs only the scores above the current tau: tau of query i is non-decreasing
    in i (candidates only join), so a candidate with u <= tau has p = 0 forever, and p of
    the others is SPARSEK over them alone."""
    from vllm_sparse.kernels.sparsek_topk import sparsek_ref

    k, window, n = 3, 2, 40
    u = random_scores(2, n, seed=7, ties=True) + random_scores(2, n, seed=8, ties=False).round(decimals=1)
    counts = (torch.arange(n) - window + 1).clamp(min=0)
    p, tau = sparsek_ref(u[:, None, :].expand(2, n, n), k, counts.expand(2, n), return_tau=True)
    assert (tau[:, 1:] >= tau[:, :-1]).all()
    for i in range(window + k + 1, n):
        for h in range(2):
            live = u[h] > tau[h, i - 1]
            live[counts[i]:] = False
            assert (p[h, i][~live] == 0).all(), (h, i)
            assert torch.allclose(sparsek_ref(u[h][live], k), p[h, i][live]), (h, i)
