# SPDX-License-Identifier: Apache-2.0
"""The one patch of vLLM for KV eviction: carrying the workers' decisions to the scheduler.

vLLM 0.32 has no channel from an attention backend to the scheduler's KV-cache manager
(the KV-connector channel, `kv_connector_worker_meta`, needs a configured KV connector,
which takes the one connector slot and changes scheduling). `install()` wraps two
functions; it runs when the evicting spec is registered (`vllm_sparse.eviction.cache`):

* worker side, `Worker.sample_tokens` (vLLM's GPU worker; the CPU worker inherits it;
  both model runners go through it): after the step's output is made, the channel's
  decisions (`channel.WORKER.collect()`, which runs a TP collective on every rank) are
  attached to the `ModelRunnerOutput` as the attribute `vllm_sparse_evictions`
  (an `AsyncModelRunnerOutput` gets them when its output is fetched). The output is a
  plain dataclass, so the attribute survives the pickling to the engine core.
* scheduler side, `Scheduler.update_from_output` (the async scheduler inherits it): the
  decisions are applied (`channel.apply`) before vLLM processes the step's output.

`tests/unit/test_eviction_patch.py` fails if either wrapped function changes upstream.
"""

import functools
from copy import copy

import torch

from vllm_sparse.eviction import channel

ATTR = "vllm_sparse_evictions"


def attach(output, evictions: channel.Evictions):
    """`output` (a model-runner output of any kind) carrying `evictions`."""
    from vllm.v1.outputs import (EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput,
                                 ModelRunnerOutput)

    if not evictions:
        return output
    if isinstance(output, AsyncModelRunnerOutput):
        get_output = output.get_output
        output.get_output = lambda: attach(get_output(), evictions)
    elif isinstance(output, ModelRunnerOutput):
        if output is EMPTY_MODEL_RUNNER_OUTPUT:
            output = copy(output)
        setattr(output, ATTR, evictions)
    return output


def wrap_sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, grammar_output):
        output = original(self, grammar_output)
        with torch.inference_mode():
            evictions = channel.WORKER.collect()
        return attach(output, evictions)

    sample_tokens.__wrapped_original__ = original
    return sample_tokens


def wrap_update_from_output(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output):
        evictions = getattr(model_runner_output, ATTR, None)
        if evictions:
            channel.apply(self, evictions)
        return original(self, scheduler_output, model_runner_output)

    update_from_output.__wrapped_original__ = original
    return update_from_output


def _install(cls, name: str, wrap) -> None:
    original = getattr(cls, name)
    if getattr(original, "__wrapped_original__", None) is None:
        setattr(cls, name, wrap(original))


def install() -> None:
    """Wrap both functions (idempotent)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_worker import Worker

    _install(Worker, "sample_tokens", wrap_sample_tokens)
    _install(Scheduler, "update_from_output", wrap_update_from_output)
