# SPDX-License-Identifier: Apache-2.0
"""Every method under vLLM's scheduling: chunked prefill and mixed prefill/decode batches
of different requests, prefix-cache hits, and preemption with recompute leave every
request's output unchanged.

Each comparison is against the same request run alone in an unconstrained engine; the
budget is far below the prompts, so the outputs depend on the sparse selection (Radar's
per-page summaries, which prefix caching shares and recompute rebuilds; Recycled's
per-request state, which must follow each request and never leak to another). After a
preemption vLLM recomputes the generated tokens as a prefill; the backend replays them
as the decode steps they were (it learns the prompt length from `runner_patch`)."""

import gc

import pytest

pytestmark = pytest.mark.e2e

METHODS = {
    "radar": {"budget": 64, "radar": {"local_window": 32}},
    "recycled-fixed": {"budget": 64, "recycled": {"schedule": "fixed", "stride": 5}},
    "recycled-dynamic": {"budget": 64, "recycled": {"check_every": 2,
                                                    "similarity_threshold": 0.95}},
}
MAX_TOKENS = 24


@pytest.fixture(scope="module", params=sorted(METHODS))
def method(request):
    return request.param


def _prompts():
    from vllm_sparse.models import long_text

    text = long_text()
    return [text[:700], text[20000:20450], text[40000:40900], text[60000:60300]]


def _llm(model, method, **kwargs):
    from vllm import LLM

    kwargs.setdefault("additional_config", {"vllm_sparse": METHODS[method]})
    kwargs.setdefault("max_model_len", 2048)
    return LLM(model=model, dtype="float32", enforce_eager=True, seed=0,
               attention_backend=method.split("-")[0], disable_log_stats=False, **kwargs)


def _tokens(llm, prompts):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def alone(tiny_model, method):
    llm = _llm(tiny_model, method, enable_prefix_caching=False)
    result = [_tokens(llm, [p])[0] for p in _prompts()]
    del llm
    gc.collect()  # now, not later under the next engine (its shutdown resets global state)
    dense_llm = _llm(tiny_model, method, enable_prefix_caching=False,
                     additional_config={"vllm_sparse": dict(METHODS[method], budget=1.0)})
    assert _tokens(dense_llm, _prompts()[:1])[0] != result[0], "budget too large to test anything"
    return result


def test_chunked_prefill_and_mixed_batches(tiny_model, method, alone):
    # 64 tokens per step: long prompts prefill in chunks while others already decode
    llm = _llm(tiny_model, method, enable_prefix_caching=False, max_num_batched_tokens=64,
               max_num_seqs=4)
    assert _tokens(llm, _prompts()) == alone


def test_prefix_cache_hits(tiny_model, method, alone):
    llm = _llm(tiny_model, method, enable_prefix_caching=True)
    prompts = _prompts()
    assert _tokens(llm, prompts[:1]) == alone[:1]
    assert _tokens(llm, prompts) == alone          # the first prompt now hits the cache
    assert _tokens(llm, prompts[::-1]) == alone[::-1]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_recompute(tiny_model, method, prefix_caching):
    """Three 256-token prompts (8 full blocks each) in 20 blocks of 32 tokens: two run,
    and growing to 72 new tokens (11 blocks each) forces one to be preempted and
    recomputed (from scratch, or from its cached blocks with prefix caching). Each
    output must equal the request run alone."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    from vllm_sparse.models import long_text

    ids = AutoTokenizer.from_pretrained(tiny_model)(long_text()[:30000])["input_ids"]
    prompts = [TokensPrompt(prompt_token_ids=ids[i * 3000: i * 3000 + 256]) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=72, ignore_eos=True)

    def run(llm, batch):
        return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False)]

    free = _llm(tiny_model, method, enable_prefix_caching=False)
    alone = [run(free, [p])[0] for p in prompts]
    del free
    tight = _llm(tiny_model, method, enable_prefix_caching=prefix_caching,
                 num_gpu_blocks_override=20, max_num_seqs=3, max_model_len=512)
    assert run(tight, prompts) == alone
    preemptions = [m for m in tight.get_metrics() if m.name == "vllm:num_preemptions"]
    assert preemptions and preemptions[0].value > 0, "the test must force a preemption"
