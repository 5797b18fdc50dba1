# SPDX-License-Identifier: Apache-2.0
"""Radar on the real SmolLM2-135M weights in the real vLLM engine (CPU, float32).

- budget covering the context: equal to vLLM's own dense backend (CPU_ATTN);
- small budget: fewer tokens attended than the context, and the same tokens, log-probs
  and attended-token counts as an independent Hugging Face + oracle implementation;
- evaluation mode (prefill as decode) gives the log-probs of real token-by-token decoding.
"""

import gc

import pytest

from vllm_sparse.config import RadarConfig
from vllm_sparse.models import long_text

pytestmark = pytest.mark.e2e

BLOCK = 32          # pinned block size; CPU_ATTN takes multiples of 32
SMALL_BUDGET = 192  # 1 sink + 64 window + 3 pages of 32 at ~700 tokens of context
LOGPROB_ATOL = 2e-3  # fp32, two different attention implementations over 30 layers


def _prompt_ids(smollm2: str, length: int, offset: int = 0) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = long_text()[offset: offset + 8 * length]
    return tokenizer(text)["input_ids"][:length]


def _engine(model: str, backend: str, **sparse):
    from vllm import LLM

    return LLM(model=model, dtype="float32", max_model_len=4096, block_size=BLOCK, seed=0,
               enforce_eager=True, attention_backend=backend,
               additional_config={"vllm_sparse": sparse} if sparse else {})


def _generate(llm, prompt_ids, max_tokens):
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    logprobs = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
    return list(completion.token_ids), logprobs


def _stats(llm):
    per_layer = llm.apply_model(lambda m: [layer.self_attn.attn.impl.stats
                                           for layer in m.model.layers])[0]
    return per_layer


def _close(llm):
    del llm
    gc.collect()


def test_full_budget_equals_dense_backend(smollm2):
    prompts = [_prompt_ids(smollm2, 900), _prompt_ids(smollm2, 300, offset=50_000)]
    dense = _engine(smollm2, "CPU_ATTN")
    expected = [_generate(dense, p, 64) for p in prompts]
    assert dense.apply_model(lambda m: m.model.layers[0].self_attn.attn.attn_backend.get_name()) \
        == ["CPU_ATTN"]
    _close(dense)
    radar = _engine(smollm2, "radar", budget=1.0)
    assert radar.apply_model(lambda m: m.model.layers[0].self_attn.attn.attn_backend.get_name()) \
        == ["RADAR"]
    got = [_generate(radar, p, 64) for p in prompts]
    stats = _stats(radar)
    _close(radar)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < LOGPROB_ATOL
    # budget 1.0 covers every context: all decode queries took the documented dense path
    assert all(s.dense_queries == 2 * 63 and s.attended_tokens == s.context_tokens for s in stats)


@pytest.fixture(scope="module")
def small_budget_run(smollm2):
    prompt = _prompt_ids(smollm2, 700)
    radar = _engine(smollm2, "radar", budget=SMALL_BUDGET)
    tokens, logprobs = _generate(radar, prompt, 24)
    stats = _stats(radar)
    _close(radar)
    return prompt, tokens, logprobs, stats


def test_small_budget_attends_fewer_tokens(small_budget_run):
    prompt, tokens, _, stats = small_budget_run
    queries = sum(s.queries for s in stats)
    attended = sum(s.attended_tokens for s in stats)
    context = sum(s.context_tokens for s in stats)
    assert queries == 30 * 3 * 23          # layers x KV heads x decode steps
    assert sum(s.dense_queries for s in stats) == 0
    assert attended <= SMALL_BUDGET * queries
    assert attended < 0.3 * context, (attended, context)


def test_small_budget_equals_independent_reference(small_budget_run, smollm2):
    from tests import hf_radar

    prompt, tokens, logprobs, stats = small_budget_run
    config = RadarConfig(**_file_radar_config())
    oracle = hf_radar.RadarOracleAttention(config, BLOCK, SMALL_BUDGET)
    ref_tokens, ref_logprobs = hf_radar.generate(smollm2, prompt, 24, oracle)
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < LOGPROB_ATOL
    assert sum(s.attended_tokens for s in stats) == oracle.attended


def _file_radar_config() -> dict:
    from vllm_sparse.config import load_model_files

    return load_model_files()["smollm2-135m-instruct.yaml"].radar.model_dump()


def test_evaluation_mode_equals_token_by_token_decoding(small_budget_run, smollm2):
    from vllm import SamplingParams, TokensPrompt

    prompt, tokens, logprobs, _ = small_budget_run
    radar = _engine(smollm2, "radar", budget=SMALL_BUDGET, eval_sparse_prefill_from=len(prompt))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    full = TokensPrompt(prompt_token_ids=prompt + tokens[:-1])
    out = radar.generate([full], params, use_tqdm=False)[0]
    stats = _stats(radar)
    _close(radar)
    scored = [out.prompt_logprobs[len(prompt) + i][t].logprob for i, t in enumerate(tokens[:-1])]
    assert max(abs(a - b) for a, b in zip(scored, logprobs[:-1])) < LOGPROB_ATOL
    # the 23 scored positions after the prompt went through the sparse path
    assert sum(s.queries for s in stats) == 30 * 3 * 23
    assert sum(s.attended_tokens for s in stats) < 0.3 * sum(s.context_tokens for s in stats)
