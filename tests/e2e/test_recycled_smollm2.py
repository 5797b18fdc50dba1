# SPDX-License-Identifier: Apache-2.0
"""Recycled Attention on the real SmolLM2-135M weights in the real vLLM engine (CPU, fp32).

- stride 1 (a full step every step) equals vLLM's own dense backend (CPU_ATTN);
- small budget, fixed and dynamic schedules: fewer tokens attended than the context, and
  the same tokens, log-probs, attended-token and full-step counts as the paper's
  algorithm written independently in Hugging Face transformers (tests/hf_recycled.py);
- evaluation mode (prefill as decode) gives the log-probs of real token-by-token decoding.
"""

import pytest

from tests.e2e.test_radar_smollm2 import (LOGPROB_ATOL, _close, _engine, _generate,
                                          _prompt_ids, _stats)

pytestmark = pytest.mark.e2e

SMALL_BUDGET = 128
NEW_TOKENS = 24
SCHEDULES = {
    "fixed": {"schedule": "fixed", "stride": 6},
    "dynamic": {"schedule": "dynamic", "check_every": 3, "similarity_threshold": 0.9},
}


def test_stride_one_equals_dense_backend(smollm2):
    prompts = [_prompt_ids(smollm2, 600), _prompt_ids(smollm2, 250, offset=50_000)]
    dense = _engine(smollm2, "CPU_ATTN")
    expected = [_generate(dense, p, 32) for p in prompts]
    _close(dense)
    recycled = _engine(smollm2, "recycled", budget=64,
                       recycled={"schedule": "fixed", "stride": 1})
    got = [_generate(recycled, p, 32) for p in prompts]
    stats = _stats(recycled)
    _close(recycled)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < LOGPROB_ATOL
    # every decode step of every layer and KV head was a full step over the whole context
    assert all(s.full_steps == s.queries == 2 * 31 * 3 for s in stats)
    assert all(s.attended_tokens == s.context_tokens for s in stats)


@pytest.fixture(scope="module", params=sorted(SCHEDULES))
def small_budget_run(request, smollm2):
    prompt = _prompt_ids(smollm2, 700)
    schedule = SCHEDULES[request.param]
    llm = _engine(smollm2, "recycled", budget=SMALL_BUDGET, recycled=schedule)
    tokens, logprobs = _generate(llm, prompt, NEW_TOKENS)
    stats = _stats(llm)
    _close(llm)
    return request.param, prompt, tokens, logprobs, stats


def test_small_budget_attends_fewer_tokens(small_budget_run):
    _, _, _, _, stats = small_budget_run
    queries = sum(s.queries for s in stats)
    assert queries == 30 * 3 * (NEW_TOKENS - 1)          # layers x KV heads x decode steps
    full = sum(s.full_steps for s in stats)
    assert 0 < full < queries / 2
    assert sum(s.attended_tokens for s in stats) < 0.4 * sum(s.context_tokens for s in stats)


def test_small_budget_equals_paper_algorithm(small_budget_run, smollm2):
    from tests import hf_radar, hf_recycled

    name, prompt, tokens, logprobs, stats = small_budget_run
    cfg = SCHEDULES[name]
    oracle = hf_recycled.RecycledOracleAttention(
        SMALL_BUDGET, cfg["schedule"], stride=cfg.get("stride", 16),
        check_every=cfg.get("check_every", 5), threshold=cfg.get("similarity_threshold", 0.85))
    ref_tokens, ref_logprobs = hf_radar.generate(smollm2, prompt, NEW_TOKENS, oracle)
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < LOGPROB_ATOL
    assert sum(s.full_steps for s in stats) == oracle.full_steps
    assert sum(s.attended_tokens for s in stats) == oracle.attended


def test_evaluation_mode_equals_token_by_token_decoding(small_budget_run, smollm2):
    from vllm import SamplingParams, TokensPrompt

    name, prompt, tokens, logprobs, decode_stats = small_budget_run
    llm = _engine(smollm2, "recycled", budget=SMALL_BUDGET, recycled=SCHEDULES[name],
                  eval_sparse_prefill_from=len(prompt))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt + tokens[:-1])], params,
                       use_tqdm=False)[0]
    stats = _stats(llm)
    _close(llm)
    scored = [out.prompt_logprobs[len(prompt) + i][t].logprob for i, t in enumerate(tokens[:-1])]
    assert max(abs(a - b) for a, b in zip(scored, logprobs[:-1])) < LOGPROB_ATOL
    # the scored positions took the same steps as real decoding did
    assert [s.full_steps for s in stats] == [s.full_steps for s in decode_stats]
    assert [s.attended_tokens for s in stats] == [s.attended_tokens for s in decode_stats]
