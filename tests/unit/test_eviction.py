# SPDX-License-Identifier: Apache-2.0
"""KV eviction pieces on their own: the tripwire on the two wrapped vLLM functions, the
evicting KV-cache manager on vLLM's real block pool, the worker channel, the wrappers,
and the StreamingLLM prototype's rule."""

import inspect
import pickle
from types import SimpleNamespace

import pytest
import torch

BLOCK = 16


# ---------------------------------------------------------------- the patch (tripwire)
def test_wrapped_vllm_functions_have_not_changed_upstream():
    """If vLLM changes these, re-check `vllm_sparse.eviction.patch`: this test then fails."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_sparse.eviction import patch

    patch.install()
    patch.install()                                    # idempotent
    for cls, name, params, needle in [
        (Worker, "sample_tokens", ["self", "grammar_output"],
         "return self.model_runner.sample_tokens(grammar_output)"),
        (Scheduler, "update_from_output", ["self", "scheduler_output", "model_runner_output"],
         "kv_connector_output = model_runner_output.kv_connector_output"),
    ]:
        original = getattr(cls, name).__wrapped_original__
        assert getattr(original, "__wrapped_original__", None) is None
        assert list(inspect.signature(original).parameters) == params
        assert needle in inspect.getsource(original)
    # subclasses in use inherit the wrapped functions
    assert "sample_tokens" not in CPUWorker.__dict__
    assert "update_from_output" not in AsyncScheduler.__dict__
    # the decisions ride on the output as a plain attribute, which pickling keeps
    output = ModelRunnerOutput(req_ids=["r"], req_id_to_index={"r": 0})
    setattr(output, patch.ATTR, {"r": [(1, 7)]})
    assert getattr(pickle.loads(pickle.dumps(output)), patch.ATTR) == {"r": [(1, 7)]}


def test_sample_tokens_wrapper_attaches_the_steps_decisions(monkeypatch):
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput

    from vllm_sparse.eviction import channel, patch

    decisions = iter([{"r": [(2, 9)]}, {"r": [(3, 4)]}, {}])
    monkeypatch.setattr(channel.WORKER, "collect", lambda: next(decisions))

    class Async(AsyncModelRunnerOutput):
        def get_output(self):
            return EMPTY_MODEL_RUNNER_OUTPUT

    outputs = iter([EMPTY_MODEL_RUNNER_OUTPUT, Async(), EMPTY_MODEL_RUNNER_OUTPUT])
    sample_tokens = patch.wrap_sample_tokens(lambda self, grammar: next(outputs))
    first = sample_tokens(None, None)
    assert first is not EMPTY_MODEL_RUNNER_OUTPUT            # the shared empty one is copied
    assert getattr(first, patch.ATTR) == {"r": [(2, 9)]}
    assert getattr(sample_tokens(None, None).get_output(), patch.ATTR) == {"r": [(3, 4)]}
    assert sample_tokens(None, None) is EMPTY_MODEL_RUNNER_OUTPUT   # nothing to carry
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, patch.ATTR)


# ---------------------------------------------------------------- spec and manager
def _spec():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_sparse.eviction.cache import evicting_spec

    return evicting_spec(FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64,
                                           dtype=torch.float32))


def _manager(num_blocks=32):
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import get_manager_for_kv_cache_spec

    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=BLOCK)
    return get_manager_for_kv_cache_spec(_spec(), max_in_flight_tokens=64, max_model_len=1024,
                                         block_pool=pool, enable_caching=False,
                                         kv_cache_group_id=0, scheduler_block_size=BLOCK)


def test_spec_is_its_own_non_cacheable_group_type():
    from vllm.v1.core.kv_cache_utils import is_kv_cache_spec_uniform
    from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs

    from vllm_sparse.eviction.cache import EvictingAttentionSpec

    spec = _spec()
    assert type(spec) is EvictingAttentionSpec and not spec.prefix_cacheable
    assert type(spec.merge([spec, _spec()])) is EvictingAttentionSpec
    dense = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)
    mixed = {"a": spec, "b": dense}
    assert not is_kv_cache_spec_uniform(mixed)       # never one group with plain layers
    assert UniformTypeKVCacheSpecs.from_specs(mixed) is None
    assert pickle.loads(pickle.dumps(spec)) == spec  # travels from workers to the engine core


def test_manager_frees_evicted_pages_into_the_pool():
    from vllm_sparse.eviction.cache import EvictingAttentionManager

    manager = _manager()
    pool = manager.block_pool
    assert isinstance(manager, EvictingAttentionManager)      # found through vLLM's registry
    assert manager.find_longest_cache_hit([], 1024, [0], pool, manager.kv_cache_spec,
                                          False, BLOCK) == (([],), 0)
    free = pool.get_num_free_blocks()
    blocks = manager.allocate_new_blocks("r", 100, 100)          # 7 pages
    ids = [b.block_id for b in blocks]
    assert pool.get_num_free_blocks() == free - 7
    freed = manager.evict("r", [(2, ids[2]), (3, ids[4]), (9, 1), (2, ids[2]), (4, ids[4])])
    assert freed == 2                  # a wrong block id, a page past the end, a repeat: skipped
    assert pool.get_num_free_blocks() == free - 5 and manager.num_evicted_blocks == 2
    assert [b.is_null for b in manager.req_to_blocks["r"]] == [0, 0, 1, 0, 1, 0, 0]
    assert manager.evict("other", [(0, ids[0])]) == 0
    more = manager.allocate_new_blocks("r", 120, 120)            # one more page: the pool
    assert [b.block_id for b in more] == [ids[2]]                # hands out freed ones first
    manager.free("r")
    assert pool.get_num_free_blocks() == free


def test_apply_reaches_running_requests_only():
    from vllm.v1.request import RequestStatus

    from vllm_sparse.eviction import channel, patch

    manager = _manager()
    for rid in ("run", "pre"):
        manager.allocate_new_blocks(rid, 64, 64)
    ids = {rid: [b.block_id for b in manager.req_to_blocks[rid]] for rid in ("run", "pre")}
    coordinator = SimpleNamespace(single_type_managers=(manager,))
    scheduler = SimpleNamespace(
        kv_cache_manager=SimpleNamespace(coordinator=coordinator),
        requests={"run": SimpleNamespace(status=RequestStatus.RUNNING),
                  "pre": SimpleNamespace(status=RequestStatus.PREEMPTED)})
    seen = []
    update = patch.wrap_update_from_output(lambda self, so, out: seen.append(out) or "outputs")
    evictions = {rid: [(1, ids[rid][1])] for rid in ids} | {"gone": [(0, 3)]}
    output = SimpleNamespace(**{patch.ATTR: evictions})
    assert update(scheduler, None, output) == "outputs" and seen == [output]
    assert manager.req_to_blocks["run"][1].is_null
    assert not manager.req_to_blocks["pre"][1].is_null
    assert channel.apply(scheduler, {}) == 0


# ---------------------------------------------------------------- the worker channel
def _metadata(key, seq_len, query_len, block_ids):
    return SimpleNamespace(request_keys=[key], seq_lens_cpu=[seq_len],
                           query_start_loc=[0, query_len], block_table=torch.tensor([block_ids]),
                           live_requests=frozenset([key]))


def test_channel_frees_what_every_layer_evicted_once_per_run(monkeypatch):
    from vllm_sparse.eviction import channel

    monkeypatch.setattr(channel, "_group_layers", lambda md: frozenset(["l0", "l1"]))
    ch = channel.WorkerChannel()
    ch.expect_block_size(BLOCK)
    key = ("r", 1)
    T, F = True, False

    md = _metadata(key, 64, 64, [5, 6, 7, 8])
    ch.report("l0", md, torch.tensor([[T, T, F, F]]), BLOCK)
    ch.report("l1", md, torch.tensor([[F, T, T, F]]), BLOCK)
    assert ch.collect() == {"r": [(1, 6)]}                       # both layers: page 1
    assert ch.collect() == {}                                    # the step was consumed

    md = _metadata(key, 65, 1, [5, 6, 7, 8, 9])
    ch.report("l0", md, torch.tensor([[T, T, T, F, F]]), BLOCK)
    ch.report("l1", md, torch.tensor([[T, T, T, F, F]]), BLOCK)
    assert ch.collect() == {"r": [(0, 5), (2, 7)]}               # page 1 was sent already

    md = _metadata(key, 66, 1, [5, 6, 7, 8, 9])
    ch.report("l0", md, torch.tensor([[T, T, T, T, F]]), BLOCK)  # l1 did not report
    assert ch.collect() == {}

    md = _metadata(key, 40, 40, [11, 12, 13])                    # recomputed from scratch
    ch.report("l0", md, torch.tensor([[T, F, F]]), BLOCK)
    ch.report("l1", md, torch.tensor([[T, F, F]]), BLOCK)
    assert ch.collect() == {"r": [(0, 11)]}

    with pytest.raises(NotImplementedError, match="kernel blocks"):
        ch.report("l0", md, torch.tensor([[T, F, F]]), 2 * BLOCK)


# ---------------------------------------------------------------- the prototype's rule
def test_streaming_evicts_pages_between_sinks_and_the_next_window():
    from vllm_sparse.eviction.streaming import streaming_evictable

    # sinks 16, window 64: after a step with context T, tokens [16, T + 1 - 64) are dead
    got = streaming_evictable([100, 145, 145, 60], [50, 50, 200, 10], 16, 64, BLOCK, 10)
    pages = [torch.nonzero(row).flatten().tolist() for row in got]
    assert pages == [[1], [1, 2, 3, 4], [], []]   # T=100: [16, 37); prompt unfinished: none
