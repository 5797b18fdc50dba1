# SPDX-License-Identifier: Apache-2.0
"""The closed-form SparseK scorer fit (`vllm_sparse.train.sparsek_fit`): relative attention
against a float64 brute force, the recording attention function leaves the dense model
unchanged, the weighted ridge solve against `torch.linalg.lstsq`, and the scorer it makes."""

import pytest
import torch

from vllm_sparse.sparsek.scorer import scores
from vllm_sparse.train import sparsek_fit as fit


def _brute_relative_attention(query, key, scaling, window):
    """Full float64 attention matrix, then the sums by definition."""
    heads_q, n, _ = query.shape
    heads = key.shape[0]
    group = heads_q // heads
    q = query.double().view(heads, group, n, -1)
    s = torch.einsum("hgid,hjd->hgij", q, key.double()) * scaling
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    a = s.masked_fill(~causal, float("-inf")).softmax(-1)
    mass = torch.zeros(heads, n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for j in range(n):
        for i in range(j + window, n):
            mass[:, j] += (i + 1) * a[:, :, i, j].sum(1)
            count[j] += group
    return mass, count


@pytest.mark.parametrize("window,query_block", [(1, 64), (5, 7), (12, 16)])
def test_relative_attention_equals_brute_force(window, query_block):
    gen = torch.Generator().manual_seed(window)
    query, key = torch.randn(6, 40, 16, generator=gen), torch.randn(2, 40, 16, generator=gen)
    mass, count = fit.relative_attention(query, key, 0.25, window, query_block)
    want_mass, want_count = _brute_relative_attention(query, key, 0.25, window)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-5)
    assert torch.equal(count, want_count)
    assert count[-window:].eq(0).all() and mass[:, -window:].eq(0).all()


def test_relative_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of Hkv"):
        fit.relative_attention(torch.randn(5, 8, 4), torch.randn(2, 8, 4), 0.5, 2)
    with pytest.raises(ValueError, match="window=0"):
        fit.relative_attention(torch.randn(4, 8, 4), torch.randn(2, 8, 4), 0.5, 0)


def test_recording_attention_is_the_dense_model(tiny_model):
    from vllm_sparse.train.distill import _hidden
    from vllm_sparse.train.nats_cli import load_model

    model, _ = load_model(tiny_model)
    ids = torch.randint(0, model.config.vocab_size, (1, 80),
                        generator=torch.Generator().manual_seed(0))
    state = fit.AttentionMass(window=8, query_block=32)
    with torch.no_grad():
        recorded = _hidden(model, ids, fit.register(), {"attention_mass": state})
        dense = _hidden(model, ids, "eager", {})
    torch.testing.assert_close(recorded, dense, rtol=1e-4, atol=1e-4)
    assert sorted(state.layers) == list(range(model.config.num_hidden_layers))
    key, value, mass, count = state.layers[0]
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    assert key.shape == value.shape == (2, 80, 64) and mass.shape == (2, 80)
    assert count[0] == (80 - 8) * group and (mass[:, count > 0] > 0).all()


def _synthetic(beta, n=50, heads=2, dim=3, seed=0):
    """Tokens whose targets are exactly beta . x: mass = count * (exp(y) - EPS)."""
    gen = torch.Generator().manual_seed(seed)
    key, value = torch.randn(heads, n, dim, generator=gen), torch.randn(heads, n, dim, generator=gen)
    x = fit.RidgeFit.features(key, value)
    y = (x @ beta[..., None])[..., 0]
    count = torch.randint(1, 20, (n,), generator=gen).double()
    return key, value, count * (y.exp() - fit.EPS), count, x, y


def test_ridge_solve_recovers_exact_targets_and_matches_lstsq():
    beta = torch.tensor([[0.3, -0.2, 0.1, 0.5, 0.0, -0.4, -0.01, -1.0],
                         [0.0, 0.2, -0.3, 0.1, 0.2, 0.3, 0.02, -2.0]], dtype=torch.float64)
    ridge_fit = fit.RidgeFit(1, 2, 3)
    key, value, mass, count, x, y = _synthetic(beta)
    ridge_fit.add(0, key, value, mass, count, min_count=1)
    torch.testing.assert_close(ridge_fit.solve(0.0)[0], beta)
    torch.testing.assert_close(ridge_fit.r_squared(ridge_fit.solve(0.0)),
                               torch.ones(1, 2, dtype=torch.float64))

    noisy = fit.RidgeFit(1, 2, 3)
    gen = torch.Generator().manual_seed(1)
    y_noisy = y + 0.3 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    mass = count * (y_noisy.exp() - fit.EPS).clamp(min=0)
    noisy.add(0, key, value, mass, count, min_count=3)
    kept = count >= 3
    y_fit = torch.log(mass[:, kept] / count[kept] + fit.EPS)
    root_w = count[kept].sqrt()[:, None]
    for h in range(2):
        want = torch.linalg.lstsq(x[h, kept] * root_w, y_fit[h][:, None] * root_w).solution[:, 0]
        torch.testing.assert_close(noisy.solve(0.0)[0, h], want)
        residual = y_fit[h] - x[h, kept] @ want
        mean = (y_fit[h] * count[kept]).sum() / count[kept].sum()
        r2 = 1 - (residual ** 2 * count[kept]).sum() / ((y_fit[h] - mean) ** 2 * count[kept]).sum()
        torch.testing.assert_close(noisy.r_squared(noisy.solve(0.0))[0, h], r2)
    assert noisy.solve(10.0).norm() < noisy.solve(0.0).norm()   # the ridge shrinks
    with pytest.raises(ValueError, match="ridge=-1"):
        noisy.solve(-1)


def test_scorer_from_scales_the_fit():
    beta = torch.randn(2, 3, 2 * 4 + 2, dtype=torch.float64)
    scorer = fit.scorer_from(beta, 20.0, k=5, window=3, meta={"x": 1})
    assert (scorer.k, scorer.window, scorer.meta) == (5, 3, {"x": 1})
    key, value = torch.randn(3, 7, 4), torch.randn(3, 7, 4)
    u = scores(key, value, *scorer.layer(1), torch.arange(7))
    want = 20.0 * (fit.RidgeFit.features(key, value) @ beta[1][..., None])[..., 0]
    torch.testing.assert_close(u.double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="sharpness=0"):
        fit.scorer_from(beta, 0, 5, 3)
