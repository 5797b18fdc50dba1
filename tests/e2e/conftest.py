# SPDX-License-Identifier: Apache-2.0
"""Fixtures shared by the end-to-end tests."""

import gc

import pytest


@pytest.fixture(autouse=True)
def collect_dropped_engines():
    """Collects dropped engines before and after each test: an in-process engine's shutdown
    tears down vLLM's global parallel state, so it must not run later, under another test's
    engine (in CI an unlucky collection did that: "pipeline model parallel group is not
    initialized"). vLLM's gc.freeze() at engine start-up hides older garbage from the
    collector until that engine's shutdown unfreezes it."""
    gc.collect()
    yield
    gc.collect()


@pytest.fixture(scope="session")
def tp1_run(tiny_model, tmp_path_factory):
    """method -> its TP=1 run of `test_tensor_parallel.METHODS[method]` (tokens, layer stats),
    in this process's engine (one rank, no workers); each method runs once per session, the
    reference of both test_tensor_parallel.py and test_ray.py."""
    from tests.e2e.test_tensor_parallel import _config, generate

    runs: dict[str, dict] = {}

    def run(method):
        if method not in runs:
            from vllm import LLM

            config = _config(method, tmp_path_factory.mktemp(method))
            llm = LLM(model=tiny_model, dtype="float32", enforce_eager=True, seed=0,
                      max_model_len=2048, attention_backend=method,
                      additional_config={"vllm_sparse": config})
            runs[method] = generate(llm)
            del llm
            gc.collect()
        return runs[method]
    return run
