# SPDX-License-Identifier: Apache-2.0
"""The one patch of vLLM's model runner: a tripwire on the wrapped function, and what it
publishes while the original builds a step's metadata."""

import inspect
from types import SimpleNamespace

import numpy as np


def test_wrapped_runner_function_has_not_changed_upstream():
    """If vLLM changes this, re-check `vllm_sparse.runner_patch`: this test then fails."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sparse import runner_patch

    runner_patch.install()
    runner_patch.install()          # idempotent
    wrapped = GPUModelRunner._build_attention_metadata
    original = wrapped.__wrapped_original__
    assert getattr(original, "__wrapped_original__", None) is None
    params = list(inspect.signature(original).parameters)
    assert params[:3] == ["self", "num_tokens", "num_reqs"]
    source = inspect.getsource(original)
    # rows of the metadata are the input batch's first num_reqs rows
    assert "num_prompt_tokens_cpu = self.input_batch.num_prompt_tokens_cpu_tensor[" in source
    assert "cm_base = CommonAttentionMetadata(" in source
    assert "rswa_prefix_lens = num_prompt_tokens_cpu" in source


def test_publishes_keys_prompt_lengths_and_live_requests_during_the_build():
    from vllm_sparse import runner_patch

    seen = []

    def original(self, num_tokens, num_reqs, **kwargs):
        seen.append(runner_patch.current_batch())
        return "metadata"

    states = {"a": object(), "b": object(), "c": object()}
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=["b", "a", "c"],
                                    num_prompt_tokens=np.array([7, 5, 9, 0])),
        requests=states)
    assert runner_patch.wrap(original)(runner, 12, 2, for_cudagraph_capture=False) == "metadata"
    (batch,) = seen
    assert batch.keys == [("b", id(states["b"])), ("a", id(states["a"]))]
    assert batch.prompt_lens == [7, 5]
    assert batch.live == frozenset((k, id(v)) for k, v in states.items())
    assert runner_patch.current_batch() is None        # nothing outside a build
