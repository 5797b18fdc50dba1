# SPDX-License-Identifier: Apache-2.0
"""`--attention-backend nats` in the real engine (in-process, CPU, float32, tiny Llama).

* all-GLOBAL gates equal vLLM's own dense backend (CPU_ATTN), token for token, with
  chunked prefill, a batch, and 32-token pages holding two 16-token chunks;
* random gates (every type occurs) with a 32-token window equal an independent Hugging
  Face reference applying `gates.visible` (tests/hf_nats.py): generated tokens, their
  log-probs and the attended (KV head, token) counts of every decode step; meanwhile
  pages are freed (fewer blocks held in the scheduler's pool than dense attention holds),
  and every freed page is filled with NaN at once, so any read of one, masked or not,
  would wreck the output;
* a forced preemption mid-generation (vLLM recomputes, the types are rebuilt) leaves the
  outputs unchanged;
* a KV pool too small for dense attention: dense must run the requests (mostly) one after
  the other, NAtS runs them all at once with the same outputs as in a large pool.
"""

import gc

import pytest
import torch

from tests.e2e import test_eviction as ev

pytestmark = pytest.mark.e2e

CHUNK, WINDOW = 16, 32
NEW_TOKENS = 64
LOGPROB_ATOL = 1e-3       # fp32; two attention implementations over 4 layers
SMALL_POOL = 48           # 16-token blocks: 768 tokens
POOL_PROMPTS = [(7000, 256), (11000, 240), (15000, 270)]
POOL_NEW_TOKENS = 64


def random_gates(num_layers=4, num_kv_heads=2, head_size=64, seed=1):
    """Seeded random gates for the tiny Llama, data-dependent (the logits vary with the
    chunk's keys and values): about 2% GLOBAL, 2% LOCAL, 96% SLIDING chunks, except layer 1
    KV head 0 with about 17% GLOBAL and 15% LOCAL (so LOCAL chunks end at a later GLOBAL).
    A page is freed only when all 8 layer x KV head decisions let it go: about half are."""
    from vllm_sparse.nats.gates import NatsGates

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_layers, num_kv_heads, 3, 2 * head_size, generator=g) * 0.3
    bias = torch.tensor([-1.5, -1.6, 1.5]).expand(num_layers, num_kv_heads, 3).clone()
    bias[1, 0] = torch.tensor([-0.2, 0.3, 0.5])
    return NatsGates(weight, bias, CHUNK, WINDOW, {"test": "random"})


@pytest.fixture(scope="module")
def gate_files(tmp_path_factory):
    from vllm_sparse.nats.gates import NatsGates

    root = tmp_path_factory.mktemp("gates")
    paths = {"global": root / "global.safetensors", "random": root / "random.safetensors"}
    NatsGates.constant(4, 2, 64, CHUNK, WINDOW).save(paths["global"])
    random_gates().save(paths["random"])
    return paths


def _nats(model, gates_path, block_size=16, **kwargs):
    from vllm import LLM

    kwargs.setdefault("max_model_len", 2048)
    return LLM(model=model, dtype="float32", enforce_eager=True, seed=0, block_size=block_size,
               attention_backend="nats", enable_prefix_caching=False, disable_log_stats=False,
               additional_config={"vllm_sparse": {"nats": {"gates": str(gates_path)}}},
               **kwargs)


def _run(llm, prompts, max_tokens, after_step=None):
    """Greedy generation, stepping the engine, freed pages poisoned with NaN after every
    step. Returns tokens and log-probs per prompt, and per step the blocks held (from the
    scheduler's block pool) and the number of running requests."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    scheduler = ev._scheduler(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "POISON", float("nan"))
        poison = ev._poisoner(llm)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                logprobs=0)
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
        done, held, running, step = {}, [], [], 0
        while engine.has_unfinished_requests():
            with poison():
                for out in engine.step():
                    if out.finished:
                        done[int(out.request_id)] = out.outputs[0]
            held.append(free_at_start - pool.get_num_free_blocks())
            running.append(len(scheduler.running))
            step += 1
            if after_step:
                after_step(step)
    assert pool.get_num_free_blocks() == free_at_start
    outs = [done[i] for i in range(len(prompts))]
    logprobs = [[lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)] for o in outs]
    return {"tokens": [list(o.token_ids) for o in outs], "logprobs": logprobs, "held": held,
            "running": running, "poisoned": getattr(poison, "count", 0),
            "preemptions": _metric(llm, "vllm:num_preemptions")}


def _metric(llm, name):
    values = [m.value for m in llm.get_metrics() if m.name == name]
    return values[0] if values else None


def _stats(llm):
    return llm.apply_model(lambda m: [layer.self_attn.attn.impl.stats
                                      for layer in m.model.layers])[0]


def _evicted(llm):
    (manager,) = ev._scheduler(llm).kv_cache_manager.coordinator.single_type_managers
    return manager.num_evicted_blocks


def test_all_global_equals_dense_backend(tiny_model, gate_files):
    """32-token pages (two chunks each), three prompts in one batch, 256-token prefill
    chunks (types carried across chunks): the same tokens and log-probs as CPU_ATTN."""
    from vllm import LLM

    prompts = [ev._prompt_ids(tiny_model, 0, 700), ev._prompt_ids(tiny_model, 4000, 333),
               ev._prompt_ids(tiny_model, 9000, 1000)]
    dense = LLM(model=tiny_model, dtype="float32", enforce_eager=True, seed=0, block_size=32,
                attention_backend="CPU_ATTN", max_model_len=2048, max_num_batched_tokens=256,
                enable_prefix_caching=False, disable_log_stats=False)
    want = _run(dense, prompts, 32)
    del dense
    gc.collect()  # now, not later under the next engine (its shutdown resets global state)
    llm = _nats(tiny_model, gate_files["global"], block_size=32, max_num_batched_tokens=256)
    got = _run(llm, prompts, 32)
    stats = _stats(llm)
    assert llm.apply_model(lambda m: m.model.layers[0].self_attn.attn.attn_backend.get_name()) \
        == ["NATS"]
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["logprobs"], want["logprobs"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < LOGPROB_ATOL
    assert _evicted(llm) == 0
    assert all(s.attended_tokens == s.context_tokens and s.queries for s in stats)
    del llm


@pytest.fixture(scope="module")
def random_engine(tiny_model, gate_files):
    llm = _nats(tiny_model, gate_files["random"])
    yield llm
    del llm
    gc.collect()  # now, not later under the next engine (its shutdown resets global state)


def counted_run(llm, prompts, max_tokens):
    """`_run`, plus the decode (KV head, token) pairs attended and the context they had,
    summed over layers, during this run."""
    before = [(s.attended_tokens, s.context_tokens) for s in _stats(llm)]
    result = _run(llm, prompts, max_tokens)
    after = _stats(llm)
    result["attended"] = sum(s.attended_tokens - b[0] for s, b in zip(after, before))
    result["context"] = sum(s.context_tokens - b[1] for s, b in zip(after, before))
    return result


@pytest.fixture(scope="module")
def random_run(tiny_model, random_engine):
    prompt = ev._prompt_ids(tiny_model, 20000, 1536)
    result = counted_run(random_engine, [prompt], NEW_TOKENS)
    result["evicted"] = _evicted(random_engine)
    return prompt, result


def test_random_gates_equal_hf_reference(tiny_model, random_run):
    from tests import hf_nats

    prompt, got = random_run
    rows, oracle = hf_nats.score(tiny_model, random_gates(), prompt, got["tokens"][0])
    for token, logprob, (ref_logprob, ref_argmax, margin) in zip(
            got["tokens"][0], got["logprobs"][0], rows):
        assert abs(logprob - ref_logprob) < LOGPROB_ATOL
        assert token == ref_argmax or margin < LOGPROB_ATOL     # greedy, up to exact ties
    assert got["attended"] == sum(oracle.attended)
    types = torch.cat([t.flatten() for t in oracle.types.values()])
    assert set(types.tolist()) == {0, 1, 2}                  # every type occurs
    assert oracle.local_ended > 0                            # LOCAL chunks that a GLOBAL ended
    assert got["attended"] < 0.5 * got["context"]


def test_random_gates_free_pages(random_run):
    prompt, got = random_run
    context = len(prompt) + NEW_TOKENS - 1
    dense_held = -(-context // 16)
    print(f"\nnats random gates, {len(prompt)}-token prompt + {NEW_TOKENS} generated: blocks "
          f"held after prefill {got['held'][0]}, max {max(got['held'])}, at the end "
          f"{got['held'][-2]} (dense: {-(-len(prompt) // 16)} .. {dense_held}); "
          f"pages freed {got['evicted']}, poisoned {got['poisoned']}")
    assert got["evicted"] > 0 and got["poisoned"] == got["evicted"]
    assert max(got["held"]) < dense_held
    assert got["held"][0] < -(-len(prompt) // 16)       # prompt pages freed after prefill


def test_preempted_request_recomputes_same_output(tiny_model, random_engine, random_run):
    """Every running request preempted mid-generation: vLLM recomputes it as a prefill,
    its types are rebuilt from the recompute and eviction resumes; outputs unchanged."""
    prompt, want = random_run
    scheduler = ev._scheduler(random_engine)

    def preempt(step):
        if step == 20:
            assert scheduler.reset_prefix_cache(reset_running_requests=True)

    got = _run(random_engine, [prompt], NEW_TOKENS, after_step=preempt)
    assert got["tokens"] == want["tokens"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"][0], want["logprobs"][0])) < 1e-4
    assert max(got["held"][21:-1]) <= max(want["held"]) + 1


def test_pool_too_small_for_dense(tiny_model, gate_files, random_engine):
    """Three requests needing 3 x 20 blocks of 16 tokens densely, in a pool of 48: dense
    attention (all-GLOBAL gates, equal to CPU_ATTN above) cannot hold two of them at once;
    NAtS runs all three together, without preemption, with the outputs of a large pool."""
    prompts = [ev._prompt_ids(tiny_model, start, n) for start, n in POOL_PROMPTS]
    need = [-(-(len(p) + POOL_NEW_TOKENS) // 16) for p in prompts]
    assert sum(need) > SMALL_POOL
    want = _run(random_engine, prompts, POOL_NEW_TOKENS)
    small = {"num_gpu_blocks_override": SMALL_POOL + 1, "max_model_len": SMALL_POOL * 16,
             "max_num_seqs": 4, "max_num_batched_tokens": 128}       # + the null block
    results = {}
    for name in ("global", "random"):
        llm = _nats(tiny_model, gate_files[name], **small)
        results[name] = _run(llm, prompts, POOL_NEW_TOKENS)
        results[name]["evicted"] = _evicted(llm)
        del llm
        gc.collect()  # now, not later under the next engine (its shutdown resets global state)
    dense, nats = results["global"], results["random"]
    for name, r in results.items():
        print(f"\npool of {SMALL_POOL} blocks, requests needing {need} blocks densely, "
              f"{'dense (all-GLOBAL)' if name == 'global' else 'nats (random gates)'}: "
              f"{len(r['held'])} engine steps, max running {max(r['running'])}, preemptions "
              f"{r['preemptions']}, max blocks held {max(r['held'])} (min free "
              f"{SMALL_POOL - max(r['held'])}), pages freed {r['evicted']}")
    assert nats["tokens"] == want["tokens"]
    assert nats["preemptions"] == 0 and max(nats["running"]) == 3
    assert dense["evicted"] == 0
    assert max(dense["running"]) < 3 or dense["preemptions"] > 0
    assert len(nats["held"]) < len(dense["held"])


@pytest.mark.parametrize("case,message", [
    ("none", "nats needs gates trained for the model and none are configured"),
    ("heads", "have KV heads=3, the model has 2; allowed: weights trained for this model"),
    ("chunk48", "chunk_size=48 (from the gates file) and KV block size 32 do not nest"),
])
def test_bad_gates_fail_at_start_up(tiny_model, tmp_path, case, message):
    from vllm import LLM

    from vllm_sparse.nats.gates import NatsGates

    path = tmp_path / "gates.safetensors"
    if case == "heads":
        NatsGates.constant(4, 3, 64, CHUNK, WINDOW).save(path)
    elif case == "chunk48":
        NatsGates.constant(4, 2, 64, 48, WINDOW).save(path)
    sparse = {"nats": {"gates": str(path)}} if case != "none" else {}
    with pytest.raises(Exception) as info:
        LLM(model=tiny_model, dtype="float32", enforce_eager=True, block_size=32,
            attention_backend="nats", max_model_len=512,
            additional_config={"vllm_sparse": sparse})
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert message in "".join(chain)
