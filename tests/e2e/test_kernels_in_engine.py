# SPDX-License-Identifier: Apache-2.0
"""The Triton kernels inside the real engine (under TRITON_INTERPRET=1 on CPU), and the Numba
CPU kernels, give the same tokens and the same attended-token counts as the torch path."""

import gc

import pytest

pytestmark = pytest.mark.e2e

SPARSE = {"budget": 64, "radar": {"local_window": 32}}


def _run(model, kernels, backend="radar"):
    from vllm import LLM, SamplingParams

    from vllm_sparse.models import long_text

    llm = LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              attention_backend=backend,
              additional_config={"vllm_sparse": dict(SPARSE, kernels=kernels)})
    prompts = [long_text()[:300], long_text()[9000:9160]]   # ~200 and ~100 tokens
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    mechanism = llm.apply_model(lambda m: m.model.layers[0].self_attn.attn.impl.mechanism.name)
    stats = llm.apply_model(lambda m: [(l.self_attn.attn.impl.stats.attended_tokens,
                                        l.self_attn.attn.impl.stats.queries,
                                        l.self_attn.attn.impl.stats.full_steps)
                                       for l in m.model.layers])[0]
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                for o in outs]
    del llm
    gc.collect()  # now, not later under the next engine (its shutdown resets global state)
    return mechanism[0], tokens, logprobs, stats


def _assert_same_as_torch(model, kernels, expected_name, backend="radar"):
    """The mechanism `kernels` resolves to `expected_name` and gives the torch path's tokens,
    log-probs (within 1e-3) and per-layer counters; returns the counters."""
    name, tokens, logprobs, stats = _run(model, kernels, backend)
    assert name == expected_name
    ref_name, ref_tokens, ref_logprobs, ref_stats = _run(model, "torch", backend)
    assert ref_name == "torch"
    assert tokens == ref_tokens
    for a, b in zip(logprobs, ref_logprobs):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    assert stats == ref_stats and all(q for _, q, _ in stats)
    return stats


def test_triton_path_equals_torch_path(tiny_model):
    attended, queries, _ = _assert_same_as_torch(tiny_model, "triton", "triton")[0]
    assert attended < 0.8 * queries * 100  # the sparse path ran: fewer than the contexts


@pytest.mark.parametrize("backend", ["radar", "recycled"])
def test_numba_path_equals_torch_path(tiny_model, backend):
    """kernels=auto on a CPU with float32 picks the Numba kernels (Radar: page scores and page
    decode; Recycled: token-mode decode), which match the torch path token for token."""
    attended, queries, full_steps = _assert_same_as_torch(tiny_model, "auto", "numba", backend)[0]
    if backend == "radar":
        assert attended < 0.8 * queries * 100   # the sparse path ran: fewer than the contexts
    else:
        assert full_steps < queries             # some (KV head, step) were partial: token mode
