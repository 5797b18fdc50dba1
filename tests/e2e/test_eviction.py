# SPDX-License-Identifier: Apache-2.0
"""KV eviction in the real engine (in-process, CPU, 16-token blocks), with the StreamingLLM
prototype (`vllm_sparse.eviction.streaming`): the worker decides which pages no later
query attends, the channel carries the decisions to the scheduler, and the evicting
KV-cache manager returns the pages to vLLM's block pool while requests run.

* KV held per request, read from the scheduler's own block pool after every engine step,
  stays bounded by the sinks' and the window's pages, while the same attention without
  eviction (Radar at budget sinks + window) holds every page of the context;
* outputs equal, token for token, those of Radar at budget sinks + window (which attends
  exactly the sinks and the window and frees nothing), also when freed pages are at once
  reused by other requests (a small block pool, LIFO reuse, chunked prefill) and when an
  evicted request is preempted and recomputed: freeing never drops a token later attended.
  Each freed page is also filled with a poison value as soon as it is freed, and freeing
  a page one page early does change the output.
"""

import contextlib
import gc

import pytest

pytestmark = pytest.mark.e2e

BLOCK = 16
SINKS, WINDOW = 16, 64
SPARSE = {"budget": SINKS + WINDOW, "radar": {"num_sink_tokens": SINKS, "local_window": WINDOW}}
HELD = -(-SINKS // BLOCK) + -(-WINDOW // BLOCK) + 1
"""Pages a request holds after a step: sink pages, window pages, the page the window's
first token shares with an evicted one."""


@pytest.fixture(scope="module")
def evicting_backend():
    """The prototype under a backend name of its own, for this module's engines."""
    from vllm.v1.attention.backends.registry import register_backend

    from vllm_sparse import plugin
    from vllm_sparse.eviction import streaming

    plugin.BACKEND_PATHS[streaming.NAME] = streaming.PATH
    register_backend(streaming.NAME, streaming.PATH)
    yield streaming.NAME.lower()
    del plugin.BACKEND_PATHS[streaming.NAME]


def _llm(model, backend, **kwargs):
    from vllm import LLM

    kwargs.setdefault("max_model_len", 2048)
    kwargs.setdefault("additional_config", {"vllm_sparse": SPARSE})
    if kwargs["additional_config"] is None:           # dense: Radar at full budget
        kwargs["additional_config"] = {"vllm_sparse": dict(SPARSE, budget=1.0)}
    return LLM(model=model, dtype="float32", enforce_eager=True, seed=0, block_size=BLOCK,
               attention_backend=backend, enable_prefix_caching=False,
               disable_log_stats=False, **kwargs)


def _prompt_ids(model, start, length):
    from transformers import AutoTokenizer

    from vllm_sparse.models import long_text

    ids = AutoTokenizer.from_pretrained(model)(long_text()[start:start + 8 * length])["input_ids"]
    assert len(ids) >= length
    return ids[:length]


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _run(llm, prompts, max_tokens, after_step=None, poison=True):
    """Generate greedily, stepping the engine; returns (tokens per prompt, KV blocks held
    after each step, read from the scheduler's block pool). With an evicting engine, every
    page freed by a step is filled with POISON before the next step, so attending to any
    of them again would wreck the output (`poison=False` for workers in other processes)."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    pool = _scheduler(llm).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    poison = _poisoner(llm) if poison else contextlib.nullcontext
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
    tokens, held, step = {}, [], 0
    while engine.has_unfinished_requests():
        with poison():
            for out in engine.step():
                if out.finished:
                    tokens[int(out.request_id)] = list(out.outputs[0].token_ids)
        held.append(free_at_start - pool.get_num_free_blocks())
        step += 1
        if after_step:
            after_step(step)
    assert pool.get_num_free_blocks() == free_at_start
    llm.poisoned_pages = getattr(poison, "count", None)
    return [tokens[i] for i in range(len(prompts))], held


POISON = 1e4


def _poisoner(llm):
    """A context manager around one engine step that poisons the pages it evicted."""
    from vllm_sparse.eviction.cache import EvictingAttentionManager

    (manager,) = _scheduler(llm).kv_cache_manager.coordinator.single_type_managers
    if not isinstance(manager, EvictingAttentionManager):
        return contextlib.nullcontext
    caches = llm.apply_model(lambda model: [layer.self_attn.attn.kv_cache
                                            for layer in model.model.layers])[0]
    freed, evict = [], manager.evict

    def recording_evict(request_id, pages):
        ids = [b.block_id for b in manager.req_to_blocks.get(request_id, [])]
        count = evict(request_id, pages)
        blocks = manager.req_to_blocks.get(request_id, [])
        freed.extend(ids[i] for i, b in enumerate(blocks) if b.is_null and ids[i] != b.block_id)
        return count

    manager.evict = recording_evict

    @contextlib.contextmanager
    def poison():
        yield
        for cache in caches:
            cache[freed] = POISON
        poison.count += len(freed)
        freed.clear()

    poison.count = 0
    return poison


def _evicted(llm):
    from vllm_sparse.eviction.cache import EvictingAttentionManager

    (manager,) = _scheduler(llm).kv_cache_manager.coordinator.single_type_managers
    assert isinstance(manager, EvictingAttentionManager)
    return manager.num_evicted_blocks


def test_kv_held_stays_bounded_and_outputs_match(tiny_model, evicting_backend):
    prompt, generated = 256, 384
    ids = [_prompt_ids(tiny_model, 0, prompt)]
    dense = _llm(tiny_model, "radar")
    want, dense_held = _run(dense, ids, generated)
    del dense
    gc.collect()  # now, not later under the next engine (its shutdown resets global state)
    # without eviction the request holds every page of its context
    assert dense_held[0] == -(-prompt // BLOCK)
    assert max(dense_held) == -(-(prompt + generated - 1) // BLOCK)

    llm = _llm(tiny_model, evicting_backend)
    tokens, held = _run(llm, ids, generated)
    assert tokens == want
    assert held[0] <= HELD                # the prefill's middle pages are freed at once
    assert max(held[:-1]) <= HELD         # and the held KV never grows with generation
    assert _evicted(llm) >= (prompt + generated - SINKS - WINDOW) // BLOCK - 2
    assert llm.poisoned_pages == _evicted(llm)


def test_a_premature_free_changes_the_output(tiny_model, evicting_backend, monkeypatch):
    """The checks have teeth: attending everything instead of sinks + window changes the
    output, and so does freeing the window's oldest page one page early (it is still
    attended, and holds POISON, or the next page written)."""
    from vllm_sparse.eviction import streaming

    ids = [_prompt_ids(tiny_model, 0, 256)]
    generated = 96
    reference = _llm(tiny_model, "radar")
    want, _ = _run(reference, ids, generated)
    del reference
    dense = _llm(tiny_model, "radar", additional_config=None)
    assert _run(dense, ids, generated)[0] != want
    del dense
    gc.collect()  # now, not later under the next engine (its shutdown resets global state)

    evictable = streaming.streaming_evictable
    monkeypatch.setattr(streaming, "streaming_evictable",
                        lambda *args: evictable(*args[:3], WINDOW - BLOCK, *args[4:]))
    llm = _llm(tiny_model, evicting_backend)
    assert _run(llm, ids, generated)[0] != want


def test_reused_pages_and_chunked_prefill(tiny_model, evicting_backend):
    """Four requests in a pool of 40 pages, which they need 84 of without eviction, 64
    tokens of prefill per step: freed pages go at once to other requests (the pool
    reuses them last-freed-first), yet every output equals the request run alone."""
    prompts = [_prompt_ids(tiny_model, 3000 * i, 200 + 40 * i) for i in range(4)]
    generated = 64
    reference = _llm(tiny_model, "radar")
    want = [_run(reference, [p], generated)[0][0] for p in prompts]
    del reference
    assert sum(-(-(len(p) + generated) // BLOCK) for p in prompts) > 40

    llm = _llm(tiny_model, evicting_backend, num_gpu_blocks_override=41,  # + the null block
               max_num_batched_tokens=64, max_num_seqs=4, max_model_len=512)
    tokens, held = _run(llm, prompts, generated)
    assert tokens == want
    assert max(held) <= 40
    assert _evicted(llm) > 40             # more pages freed than the pool has
    preemptions = [m for m in llm.get_metrics() if m.name == "vllm:num_preemptions"]
    assert preemptions and preemptions[0].value == 0


def test_preempted_request_recomputes_same_output(tiny_model, evicting_backend):
    """Preempting every running request mid-generation (vLLM then recomputes them from
    their tokens, replaying generated ones as decode steps) leaves outputs unchanged, and
    the recomputed requests are evicted again."""
    prompts = [_prompt_ids(tiny_model, 5000, 300), _prompt_ids(tiny_model, 9000, 260)]
    generated = 96
    reference = _llm(tiny_model, "radar")
    want, _ = _run(reference, prompts, generated)
    del reference

    llm = _llm(tiny_model, evicting_backend)
    scheduler = _scheduler(llm)

    def preempt(step):
        if step == 40:
            assert scheduler.reset_prefix_cache(reset_running_requests=True)

    tokens, held = _run(llm, prompts, generated, after_step=preempt)
    assert tokens == want
    assert held[40] <= 2 * HELD           # the recompute's middle pages were freed again
    assert max(held[41:-1]) <= 2 * HELD


TP_SCRIPT = r'''
import json, sys
from vllm.v1.attention.backends.registry import register_backend
from vllm_sparse import plugin
from vllm_sparse.eviction import streaming

# at import, so that spawned workers (which re-import this file) know the backend, and
# rank 1 keeps every odd page: only pages both ranks evicted may be freed
plugin.BACKEND_PATHS[streaming.NAME] = streaming.PATH
register_backend(streaming.NAME, streaming.PATH)
rule = streaming.streaming_evictable


def vetoed(*args):
    from vllm.distributed.parallel_state import get_tp_group

    evictable = rule(*args)
    if get_tp_group().rank_in_group == 1:
        evictable[:, 1::2] = False
    return evictable


streaming.streaming_evictable = vetoed

if __name__ == "__main__":
    from tests.e2e.test_eviction import _evicted, _llm, _run, _scheduler

    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = _llm(model, streaming.NAME.lower(), tensor_parallel_size=2)
    manager = _scheduler(llm).kv_cache_manager.coordinator.single_type_managers[0]
    freed_pages = set()

    def note(step):
        freed_pages.update(i for blocks in manager.req_to_blocks.values()
                           for i, block in enumerate(blocks) if block.is_null)

    tokens, held = _run(llm, prompts, 64, after_step=note, poison=False)
    print("RESULT" + json.dumps({"tokens": tokens, "held": held, "evicted": _evicted(llm),
                                 "freed_pages": sorted(freed_pages)}))
'''


def test_tensor_parallel_ranks_must_all_evict_a_page(tiny_model, evicting_backend, tmp_path):
    """TP=2 (two worker processes; decisions cross a process boundary to the scheduler):
    a page is freed only when both ranks evicted it. Rank 1 keeps every odd page here, so
    only even pages are freed, and outputs still equal Radar's in one process."""
    import json
    import os
    import subprocess
    import sys

    prompts = [_prompt_ids(tiny_model, 0, 200), _prompt_ids(tiny_model, 20000, 230)]
    reference = _llm(tiny_model, "radar")
    want, _ = _run(reference, prompts, 64)
    del reference

    script = tmp_path / "tp_eviction.py"
    script.write_text(TP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", PYTHONPATH=root,
               VLLM_ENABLE_V1_MULTIPROCESSING="0")    # engine core here, workers apart
    proc = subprocess.run([sys.executable, str(script), tiny_model, json.dumps(prompts)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert result["tokens"] == want
    assert result["evicted"] > 0
    assert result["freed_pages"] and all(page % 2 == 0 for page in result["freed_pages"])
