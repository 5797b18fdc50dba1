# SPDX-License-Identifier: Apache-2.0
"""vLLM's Ray executor on CPU (`VLLM_SPARSE_CPU_RAY=1`): Radar inside Ray worker actors gives
the single-process output, token for token and in attended tokens.

Each run is a subprocess with its own local Ray instance (`address="local"`, so a cluster
someone else started is never joined), declaring one logical `GPU` slot per CPU worker
(see `vllm_sparse/ray_cpu_platform.py`). The engine runs in its own process, as under
`vllm serve`, and joins that instance through `RAY_ADDRESS`; Ray is shut down before the
script exits. The reference is TP=1 in the test process (the `tp1_run` fixture;
the mp executor's TP=2 equals it there)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.test_tensor_parallel import METHODS, ROOT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="ray is not installed (pip install ray)"),
]

SCRIPT = r"""
import json, os, sys
import ray
from vllm import LLM
from tests.e2e.test_ray import worker_facts
from tests.e2e.test_tensor_parallel import generate

model, sparse, tp = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
ctx = ray.init(address="local", num_cpus=2, num_gpus=tp, include_dashboard=False)
os.environ["RAY_ADDRESS"] = ctx.address_info["gcs_address"]  # for the engine process
llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=2048,
          tensor_parallel_size=tp, distributed_executor_backend="ray",
          attention_backend="radar", additional_config={"vllm_sparse": sparse})
result = {**generate(llm), "facts": llm.apply_model(worker_facts)}
del llm
ray.shutdown()
print("RESULT" + json.dumps(result))
"""


def worker_facts(model):
    """Where this rank runs: vLLM's platform class, and its Ray actor id (None outside Ray)."""
    from vllm.platforms import current_platform

    actor = None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        actor = sys.modules["ray"].get_runtime_context().get_actor_id()
    return type(current_platform).__name__, actor


def _run_ray(model, tp, ray_executor):
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # apply_model pickles
               PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0", VLLM_SPARSE_CPU_RAY="1",
               VLLM_USE_RAY_V2_EXECUTOR_BACKEND="1" if ray_executor == "v2" else "0")
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "RAY_ADDRESS"):
        env.pop(name, None)
    args = [sys.executable, "-c", SCRIPT, model, json.dumps(METHODS["radar"]), str(tp)]
    # own process group: on a timeout, Ray's processes go with the script
    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.split("RESULT", 1)[1].splitlines()[0])


# TP=2 through both of vLLM's Ray executors: RayExecutorV2 (the default) and the legacy
# RayDistributedExecutor (Ray compiled graph). (TP=1 through Ray also passes; it is left out
# of CI to save its two minutes.)
@pytest.mark.parametrize("tp, ray_executor", [(2, "v2"), (2, "legacy")])
def test_ray_executor_equals_tp1(tiny_model, tp1_run, tp, ray_executor):
    one_rank = tp1_run("radar")             # shared with test_tensor_parallel.py
    got = _run_ray(tiny_model, tp, ray_executor)
    assert got["tokens"] == one_rank["tokens"]
    assert len(got["facts"]) == tp and len({actor for _, actor in got["facts"]}) == tp
    for platform, actor in got["facts"]:     # each rank is its own Ray actor
        assert platform == "RayCpuPlatform" and actor
    (one,) = one_rank["stats"]
    for rank in got["stats"]:
        for kv_heads, queries, attended, context in rank:
            assert kv_heads == 2 // tp
            assert queries > 0 and attended < 0.75 * context   # sparse, in the actor
    for layer, (_, _, attended, _) in enumerate(one):  # ranks' attended tokens add up
        assert sum(rank[layer][2] for rank in got["stats"]) == attended
