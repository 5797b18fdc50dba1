# SPDX-License-Identifier: Apache-2.0
"""`--attention-backend sparsek` in the real engine (in-process, CPU, float32, tiny Llama,
16-token blocks).

* k larger than every context: equal to vLLM's own dense backend (CPU_ATTN), token for
  token, with chunked prefill and a batch of three requests;
* a random scorer (k = 48, window 32; the Numba prefill rule and decode step): generated
  tokens, their log-probs and the attended (KV head, token) count of every decode step
  equal an independent Hugging Face reference
  that applies the rule to the whole context at every step (tests/hf_sparsek.py), while
  the backend keeps only k slots per KV head, compacted, and frees every other page: each
  freed page is filled with NaN at once, so any read of one would wreck the output;
* KV held per request stays bounded as generation grows: a 2K prompt and 2K generated
  tokens, blocks held read from the scheduler's own block pool after every engine step;
* kernels="torch" and the Numba kernels give the same outputs and counts;
* a forced preemption mid-generation (vLLM recomputes the request as a prefill, by the
  same rule) leaves the outputs unchanged;
* bad configurations fail at start-up, naming the bad value and the allowed ones.
"""

import gc

import pytest
import torch

from tests.e2e import test_eviction as ev
from tests.e2e.test_nats import _run, _stats, counted_run

pytestmark = pytest.mark.e2e

BLOCK, WINDOW, K = 16, 32, 48
BUDGET = K + WINDOW
LOGPROB_ATOL = 1e-3        # fp32 engine against the float64 reference, 4 layers
HELD = -(-K // BLOCK) + -(-(WINDOW + 1) // BLOCK) + 1
"""Pages a compacted request holds: its slot pages, the window's, the one the window's
oldest token shares with a freed one."""


def random_scorer(seed=0, num_layers=4, num_kv_heads=2, head_size=64, window=WINDOW):
    """Seeded random scorer for the tiny Llama: scores spread over a few units, so SPARSEK's
    p takes values strictly between 0 and 1 as well as 0 and 1, and a small positive slope."""
    from vllm_sparse.sparsek.scorer import SparseKScorer

    g = torch.Generator().manual_seed(seed)
    return SparseKScorer(torch.randn(num_layers, num_kv_heads, 2 * head_size, generator=g) * 0.5,
                         torch.zeros(num_layers, num_kv_heads),
                         torch.full((num_layers, num_kv_heads), 0.002), K, window,
                         {"test": "random"})


@pytest.fixture(scope="module")
def scorer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scorer") / "random.safetensors"
    random_scorer().save(path)
    return path


def _sparsek(model, scorer_path, budget=BUDGET, window=None, kernels="auto", **kwargs):
    from vllm import LLM

    kwargs.setdefault("max_model_len", 2048)
    sparsek = {"scorer": str(scorer_path)} | ({} if window is None else {"window": window})
    return LLM(model=model, dtype="float32", enforce_eager=True, seed=0, block_size=BLOCK,
               attention_backend="sparsek", enable_prefix_caching=False,
               disable_log_stats=False,
               additional_config={"vllm_sparse": {"budget": budget, "sparsek": sparsek,
                                                  "kernels": kernels}},
               **kwargs)


def test_k_above_context_equals_dense_backend(tiny_model, scorer_file):
    from vllm import LLM

    prompts = [ev._prompt_ids(tiny_model, 0, 700), ev._prompt_ids(tiny_model, 4000, 333),
               ev._prompt_ids(tiny_model, 9000, 1000)]
    dense = LLM(model=tiny_model, dtype="float32", enforce_eager=True, seed=0, block_size=32,
                attention_backend="CPU_ATTN", max_model_len=2048, max_num_batched_tokens=256,
                enable_prefix_caching=False, disable_log_stats=False)
    want = _run(dense, prompts, 32)
    del dense
    gc.collect()  # now, not later under the next engine (its shutdown resets global state)
    llm = _sparsek(tiny_model, scorer_file, budget=4096, max_num_batched_tokens=256)
    got = _run(llm, prompts, 32)
    assert llm.apply_model(lambda m: m.model.layers[0].self_attn.attn.attn_backend.get_name()) \
        == ["SPARSEK"]
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["logprobs"], want["logprobs"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < LOGPROB_ATOL
    stats = _stats(llm)
    assert all(s.attended_tokens == s.context_tokens and s.queries for s in stats)
    assert ev._evicted(llm) == 0
    del llm


@pytest.mark.parametrize("window", [16, 0.25])
def test_window_from_config_equals_hf_reference(tiny_model, scorer_file, window):
    """sparsek.window replaces the file's window (32), as a count or a fraction of the budget
    (0.25 of 64 = 16): k = budget - 16 = 48 and the HF reference run with window 16 agree.
    (Before the module's shared engine exists: deleting an in-process engine tears down the
    global parallel state another live one uses.)"""
    from tests import hf_sparsek

    llm = _sparsek(tiny_model, scorer_file, budget=K + 16, window=window)
    prompt = ev._prompt_ids(tiny_model, 20000, 700)
    got = counted_run(llm, [prompt], 24)
    del llm
    rows, oracle = hf_sparsek.score(tiny_model, random_scorer(window=16), K, prompt,
                                    got["tokens"][0])
    for token, logprob, (ref_logprob, ref_argmax, margin) in zip(
            got["tokens"][0], got["logprobs"][0], rows):
        assert abs(logprob - ref_logprob) < LOGPROB_ATOL
        assert token == ref_argmax or margin < LOGPROB_ATOL
    steps = len(got["tokens"][0]) - 1
    assert got["attended"] == sum(oracle.attended) == steps * 4 * 2 * (K + 16)


def test_torch_mechanism_equals_numba(tiny_model, scorer_file):
    """kernels="torch" (the torch rule, step and gathered decode) and kernels="auto" (the
    Numba ones on this CPU) give the same tokens, log-probs and attended counts, prefill
    and decode, with two requests in one batch."""
    prompts = [ev._prompt_ids(tiny_model, 20000, 700), ev._prompt_ids(tiny_model, 3000, 300)]
    runs = {}
    for kernels in ("torch", "auto"):
        llm = _sparsek(tiny_model, scorer_file, kernels=kernels)
        runs[kernels] = counted_run(llm, prompts, 24)
        runs[kernels]["mechanism"] = llm.apply_model(
            lambda m: m.model.layers[0].self_attn.attn.impl.mechanism.name)
        del llm
        gc.collect()  # now, not later under the next engine (its shutdown resets global state)
    assert runs["torch"]["mechanism"] == ["torch"] and runs["auto"]["mechanism"] == ["numba"]
    assert runs["auto"]["tokens"] == runs["torch"]["tokens"]
    for a, b in zip(runs["auto"]["logprobs"], runs["torch"]["logprobs"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert runs["auto"]["attended"] == runs["torch"]["attended"] > 0


@pytest.fixture(scope="module")
def random_engine(tiny_model, scorer_file):
    llm = _sparsek(tiny_model, scorer_file, max_model_len=4096)
    yield llm
    del llm
    gc.collect()  # now, not later under the next engine (its shutdown resets global state)


@pytest.fixture(scope="module")
def random_run(tiny_model, random_engine):
    prompt = ev._prompt_ids(tiny_model, 20000, 700)
    return prompt, counted_run(random_engine, [prompt], 64)


def test_random_scorer_equals_hf_reference(tiny_model, random_engine, random_run):
    """Prefill's rule ran as the Numba sweep (kernels=auto, float32 on a CPU), decode as the
    policy's compacted slots, updated by the Numba step; both against the HF reference."""
    from tests import hf_sparsek

    prompt, got = random_run
    impl = random_engine.apply_model(
        lambda m: (m.model.layers[0].self_attn.attn.impl._sparsek_kernels,
                   m.model.layers[0].self_attn.attn.impl.sparsek._admit_step.__name__))
    assert impl == [("numba", "cpu_sparsek_admit")]
    rows, oracle = hf_sparsek.score(tiny_model, random_scorer(), K, prompt, got["tokens"][0])
    for token, logprob, (ref_logprob, ref_argmax, margin) in zip(
            got["tokens"][0], got["logprobs"][0], rows):
        assert abs(logprob - ref_logprob) < LOGPROB_ATOL
        assert token == ref_argmax or margin < LOGPROB_ATOL     # greedy, up to exact ties
    # decode steps only: the first token comes from the prefill
    assert got["attended"] == sum(oracle.attended)
    steps = len(got["tokens"][0]) - 1
    assert got["attended"] == steps * 4 * 2 * BUDGET             # k + W per layer and KV head
    assert got["attended"] < 0.15 * got["context"]


def test_random_scorer_frees_pages(random_run):
    prompt, got = random_run
    print(f"\nsparsek k={K} W={WINDOW}, {len(prompt)}-token prompt + 64 generated: blocks "
          f"held after prefill {got['held'][0]}, then {got['held'][1:4]} .. "
          f"{got['held'][-3:]}; pages poisoned when freed: {got['poisoned']}")
    assert got["poisoned"] > 0
    assert max(got["held"][1:-1]) <= HELD


def test_preempted_request_recomputes_same_output(tiny_model, random_engine, random_run):
    """The running request preempted mid-generation: vLLM recomputes it as a prefill of
    prompt + generated tokens (the prefill rule is the decode rule), compaction and
    eviction resume; outputs unchanged."""
    prompt, want = random_run
    scheduler = ev._scheduler(random_engine)

    def preempt(step):
        if step == 20:
            assert scheduler.reset_prefix_cache(reset_running_requests=True)

    got = _run(random_engine, [prompt], 64, after_step=preempt)
    assert got["preemptions"] and got["preemptions"] >= 1
    assert got["tokens"] == want["tokens"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"][0], want["logprobs"][0])) < 1e-4
    assert max(got["held"][22:-1]) <= HELD


def test_kv_held_bounded_2k_prompt_2k_generated(tiny_model, random_engine):
    """Issue's sizes: 16-token blocks, a 2K prompt, 2K generated tokens. Dense attention
    would end holding 256 blocks; SparseK holds its slots and window after the prompt."""
    prompt = ev._prompt_ids(tiny_model, 30000, 2048)
    got = _run(random_engine, [prompt], 2048)
    held = got["held"]
    print(f"\nsparsek, 2048-token prompt + 2048 generated, 16-token blocks: blocks held after "
          f"prefill {held[0]}, max over the 2047 decode steps {max(held[1:-1])} (dense would "
          f"grow to {-(-4095 // BLOCK)}), pages freed {got['poisoned']}")
    assert held[0] >= 2048 // BLOCK
    assert max(held[1:-1]) <= HELD
    assert all(lp == lp for lp in got["logprobs"][0])          # no NaN: no freed page read
    assert got["poisoned"] >= 2048 * 2 // BLOCK - HELD


@pytest.mark.parametrize("case,message", [
    ("none", "sparsek needs a scorer trained for the model and none is configured"),
    ("fraction", "budget=0.25 must be an integer token count"),
    ("small", f"budget={WINDOW} leaves no room for the top-k after the scorer's window of "
              f"{WINDOW} tokens; allowed: budget >= {WINDOW + 1}"),
    ("heads", "have KV heads=3, the model has 2; allowed: weights trained for this model"),
    ("window", f"budget={BUDGET} leaves no room for the top-k after sparsek.window's window of "
               f"{BUDGET} tokens"),
    ("fraction_window", "window=1.5: a fraction of the budget must be in (0, 1)"),
])
def test_bad_config_fails_at_start_up(tiny_model, tmp_path, scorer_file, case, message):
    from vllm import LLM

    config = {"budget": BUDGET, "sparsek": {"scorer": str(scorer_file)}}
    if case == "none":
        config["sparsek"] = {}
    elif case == "fraction":
        config["budget"] = 0.25
    elif case == "small":
        config["budget"] = WINDOW
    elif case == "heads":
        path = tmp_path / "heads.safetensors"
        random_scorer(num_kv_heads=3).save(path)
        config["sparsek"]["scorer"] = str(path)
    elif case == "window":
        config["sparsek"]["window"] = BUDGET
    elif case == "fraction_window":
        config["sparsek"]["window"] = 1.5
    with pytest.raises(Exception) as info:
        LLM(model=tiny_model, dtype="float32", enforce_eager=True, block_size=BLOCK,
            attention_backend="sparsek", max_model_len=512,
            additional_config={"vllm_sparse": config})
    assert message in "".join(str(e) for e in _chain(info.value))


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__
