# SPDX-License-Identifier: Apache-2.0
"""Request identity and prompt length for the attention backend: the one patch of
vLLM's model runner.

vLLM 0.32's attention metadata carries no request identity, and each request's prompt
length only for R-SWA models. Two things need them:

* Recycled Attention keeps per-request state between steps (the tokens recycled from
  its last full step), which must follow the request through continuous batching and
  preemption and must never be read by another request;
* after a preemption vLLM recomputes the generated tokens as a prefill; to give them the
  values they had (sparse decode steps, not dense prefill), the backend must know where
  the prompt ends.

`install()` wraps `GPUModelRunner._build_attention_metadata` (the V1 runner; vLLM's CPU
runner inherits it). While the original builds the step's metadata, the wrapper
publishes, for the rows being built, each request's key (its id and the identity of
the runner's state object, so an aborted and resubmitted id is a new request), its prompt
length, and the keys of every request the runner still holds. `SparseMetadataBuilder`
reads them with `current_batch()`. `tests/unit/test_runner_patch.py` fails if the
wrapped function changes upstream. vLLM's V2 model runner is not patched: stateful
methods refuse it at start-up (see `vllm_sparse.backend`).
"""

import functools
from dataclasses import dataclass

RequestKey = tuple[str, int]


@dataclass(frozen=True)
class BatchRequests:
    """The rows of one step: keys [B], prompt_lens [B] (host lists), live: every request
    the runner holds (running, waiting after a preemption, or unscheduled this step)."""

    keys: list[RequestKey]
    prompt_lens: list[int]
    live: frozenset[RequestKey]


_current: BatchRequests | None = None


def current_batch() -> BatchRequests | None:
    """The batch whose metadata is being built, or None outside the patched runner."""
    return _current


def _publish(runner, num_reqs: int) -> BatchRequests:
    batch = runner.input_batch
    req_ids = batch.req_ids[:num_reqs]
    keys = [(rid, id(runner.requests[rid])) for rid in req_ids]
    live = frozenset((rid, id(state)) for rid, state in runner.requests.items())
    return BatchRequests(keys, batch.num_prompt_tokens[:num_reqs].tolist(), live)


def wrap(original):
    """`original` (the runner's metadata build) publishing the batch while it runs."""

    @functools.wraps(original)
    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        global _current
        _current = _publish(self, num_reqs)
        try:
            return original(self, num_tokens, num_reqs, *args, **kwargs)
        finally:
            _current = None

    _build_attention_metadata.__wrapped_original__ = original
    return _build_attention_metadata


def install() -> None:
    """Wrap the V1 runner's metadata build (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._build_attention_metadata
    if getattr(original, "__wrapped_original__", None) is None:
        GPUModelRunner._build_attention_metadata = wrap(original)
