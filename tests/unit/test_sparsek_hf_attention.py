# SPDX-License-Identifier: Apache-2.0
"""SparseK as a transformers attention function (vllm_sparse/sparsek/hf_attention.py):
dense limit, a naive per-query reference, KV-cache queries, gradients, gradcheck and a
tiny Llama end to end."""

from types import SimpleNamespace

import pytest
import torch

from vllm_sparse.sparsek.hf_attention import (ATTN_NAME, SparseKParams, SparseKStep, register,
                                              sparsek_attention_forward)
from vllm_sparse.sparsek.scorer import SparseKScorer

B, HQ, HKV, N, D, LAYERS = 2, 4, 2, 19, 8, 2


def make_inputs(seed: int, dtype=torch.float32, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g, dtype=dtype) for h in (HQ, HKV, HKV))
    scorer = SparseKScorer(scale * torch.randn(LAYERS, HKV, 2 * D, generator=g),
                           torch.randn(LAYERS, HKV, generator=g),
                           0.1 * torch.randn(LAYERS, HKV, generator=g), k=3, window=2)
    return q, k, v, scorer


def run(q, k, v, params, layer=1, query_block=5, **step):
    module = SimpleNamespace(layer_idx=layer)
    sk = SparseKStep(params, query_block=query_block, **step)
    return sparsek_attention_forward(module, q, k, v, None, scaling=D ** -0.5, sparsek=sk)[0], sk


# ---- naive reference (independent of the module) ----

def naive_p(z: list[float], k: int) -> list[float]:
    """SPARSEK by bisection in float64 (all ones if len(z) <= k)."""
    if len(z) <= k:
        return [1.0] * len(z)
    lo, hi = min(z) - 1.0, max(z)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(min(max(x - mid, 0.0), 1.0) for x in z) >= k else (lo, mid)
    return [min(max(x - (lo + hi) / 2, 0.0), 1.0) for x in z]


def naive_attention(q, k, v, w, b, slope, top_k, window):
    """One sequence, float64 loops: q [Hq, N, D], k / v [Hkv, N, D] -> [N, Hq, D]."""
    q, k, v, w, b, slope = (t.double() for t in (q, k, v, w, b, slope))
    n, group = k.shape[1], q.shape[0] // k.shape[0]
    out = torch.zeros(n, q.shape[0], q.shape[2], dtype=torch.float64)
    for h in range(q.shape[0]):
        kh = h // group
        u = [float(torch.cat([k[kh, j], v[kh, j]]) @ w[kh] + b[kh] + slope[kh] * j) for j in range(n)]
        for i in range(n):
            cand = list(range(max(0, i - window + 1)))
            p = dict(zip(cand, naive_p([u[j] for j in cand], top_k)))
            top = sorted(cand, key=lambda j: (-u[j], j))[:top_k]
            keys = top + list(range(max(0, i - window + 1), i + 1))
            weight = torch.tensor([p.get(j, 1.0) if j in top else 1.0 for j in keys], dtype=torch.float64)
            logits = torch.stack([q[h, i] @ k[kh, j] for j in keys]) * D ** -0.5
            out[i, h] = (logits.softmax(0) * weight) @ v[kh, keys]
    return out


def dense_causal(q, k, v):
    kk, vv = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True).transpose(1, 2)


# ---- tests ----

@pytest.mark.parametrize("top_k, window", [(N, 0), (N + 5, 3), (30, 1)])
def test_large_k_is_dense_causal(top_k, window):
    q, k, v, s = make_inputs(0)
    s.k, s.window = top_k, window
    out, _ = run(q, k, v, s)
    assert torch.allclose(out, dense_causal(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernels", ["auto", "numba"])
@pytest.mark.parametrize("top_k, window, scale", [(3, 2, 1.0), (1, 0, 0.3), (2, 5, 0.1), (4, 1, 3.0)])
def test_small_k_matches_naive_loop(top_k, window, scale, kernels):
    """Also through the CPU rule kernel, which attends each block over only its keys."""
    q, k, v, s = make_inputs(1, scale=scale)
    s.k, s.window = top_k, window
    out, step = run(q, k, v, s, kernels=kernels)
    w, b, slope = s.layer(1)
    for i in range(B):
        ref = naive_attention(q[i], k[i], v[i], w, b, slope, top_k, window)
        assert torch.allclose(out[i].double(), ref, atol=1e-5), i
    assert 0 < step.top[1] and step.p_sum[1] <= step.top[1] + 1e-6


def test_kv_cache_queries_and_no_grad():
    """Eval: the last Nq queries against the whole K/V (a decode step) equal the
    corresponding rows of the full forward; no_grad gives the same result."""
    q, k, v, s = make_inputs(2)
    params = SparseKParams(s)
    full, _ = run(q, k, v, params)
    with torch.no_grad():
        tail, _ = run(q[:, :, -4:], k, v, s)
        last, _ = run(q[:, :, -1:], k, v, s)
    assert torch.allclose(tail, full[:, -4:].detach(), atol=1e-6)
    assert torch.allclose(last, full[:, -1:].detach(), atol=1e-6)


def test_numba_rule_same_output_and_stats():
    """kernels="numba" (compact blocks) against the torch rule: outputs, the logging
    counters, and the last queries against the whole K/V (a decode step)."""
    q, k, v, s = make_inputs(3, scale=2.0)
    with torch.no_grad():
        for queries in (slice(None), slice(-4, None)):
            want, want_step = run(q[:, :, queries], k, v, s, kernels="torch")
            got, got_step = run(q[:, :, queries], k, v, s, kernels="numba")
            assert torch.allclose(got, want, atol=1e-6)
            for name in ("p_sum", "free", "top"):
                assert getattr(got_step, name) == pytest.approx(getattr(want_step, name), rel=1e-6)
    assert want_step.top[1] > 0 and 0 < want_step.free[1]


def test_numba_rule_refuses_gradients():
    q, k, v, s = make_inputs(4)
    with pytest.raises(ValueError, match="kernels='numba' has no backward"):
        run(q, k, v, SparseKParams(s), kernels="numba")


@pytest.mark.parametrize("detach", [False, True])
def test_gradients_reach_scorer(detach):
    q, k, v, s = make_inputs(3, scale=0.2)
    params = SparseKParams(s)
    k.requires_grad_(True)
    out, step = run(q, k, v, params, detach_features=detach)
    out.square().sum().backward()
    for name in ("weight", "slope"):
        g = getattr(params, name).grad
        assert torch.isfinite(g).all() and g[1].abs().sum() > 0 and g[0].abs().sum() == 0, name
    # the bias shifts all scores of a head alike: SPARSEK and top-k ignore it (zero gradient)
    db = params.bias.grad
    assert torch.isfinite(db).all() and db.abs().max() < 1e-5 * params.weight.grad.abs().max()
    assert step.free[1] > 0 and torch.isfinite(k.grad).all()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 9, 3, generator=g, dtype=torch.float64) for h in (2, 1, 1))
    w = (0.3 * torch.randn(1, 6, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    slope = torch.full((1,), 0.05, dtype=torch.float64, requires_grad=True)
    v.requires_grad_(True)

    def f(w, b, slope, v):
        params = SimpleNamespace(k=2, window=2, layer=lambda i: (w, b, slope))
        module = SimpleNamespace(layer_idx=0)
        sk = SparseKStep(params, query_block=4)
        return sparsek_attention_forward(module, q, k, v, None, scaling=0.5, sparsek=sk)[0]

    assert torch.autograd.gradcheck(f, (w, b, slope, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_missing_step_and_registration():
    with pytest.raises(RuntimeError, match="sparsek=SparseKStep"):
        sparsek_attention_forward(SimpleNamespace(layer_idx=0), *make_inputs(0)[:3], None)
    assert register() == register() == ATTN_NAME


def test_tiny_llama_dense_limit():
    """Through transformers: the model kwarg reaches the function; k >= N is dense."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        dense = model(ids).logits
        model.config._attn_implementation = register()
        step = SparseKStep(SparseKScorer.zeros(2, 2, 8, k=16, window=1))
        sparse = model(ids, sparsek=step).logits
        step_small = SparseKStep(SparseKScorer.zeros(2, 2, 8, k=2, window=2))
        small = model(ids, sparsek=step_small).logits
    assert torch.allclose(sparse, dense, atol=1e-5)
    assert sorted(step.top) == [0, 1] and not torch.allclose(small, dense, atol=1e-3)
