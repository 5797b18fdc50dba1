# SPDX-License-Identifier: Apache-2.0
"""vLLM's Ray executor on CPU (`VLLM_SPARSE_CPU_RAY=1`): Radar inside Ray worker actors gives
the mp executor's output, token for token and in attended tokens.

Each run is a subprocess with its own local Ray instance (`address="local"`, so a cluster
someone else started is never joined), declaring one logical `GPU` slot per CPU worker
(see `vllm_sparse/ray_cpu_platform.py`). The engine runs in its own process, as under
`vllm serve`, and joins that instance through `RAY_ADDRESS`; Ray is shut down before the
script exits. The reference is the mp executor at TP=1 (its TP=2 equals TP=1:
test_tensor_parallel.py)."""

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
from vllm import LLM, SamplingParams
from vllm_sparse.models import long_text

model, sparse, tp, backend = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if backend == "ray":
    import ray
    ctx = ray.init(address="local", num_cpus=2, num_gpus=tp, include_dashboard=False)
    os.environ["RAY_ADDRESS"] = ctx.address_info["gcs_address"]  # for the engine process
text = long_text()
prompts = [text[:900], text[30000:30500]]
llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=2048,
          tensor_parallel_size=tp, distributed_executor_backend=backend,
          attention_backend="radar", additional_config={"vllm_sparse": sparse})
params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
from tests.e2e.test_ray import worker_facts
from tests.e2e.test_tensor_parallel import layer_stats
facts, stats = llm.apply_model(worker_facts), llm.apply_model(layer_stats)
del llm
if backend == "ray":
    ray.shutdown()
print("RESULT" + json.dumps({"tokens": tokens, "facts": facts, "stats": stats}))
"""


def worker_facts(model):
    """Where this rank runs: vLLM's platform class, and its Ray actor id (None outside Ray)."""
    from vllm.platforms import current_platform

    actor = None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        actor = sys.modules["ray"].get_runtime_context().get_actor_id()
    return type(current_platform).__name__, actor


def _run(model, tp, backend, ray_executor="v2"):
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # apply_model pickles
               PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "RAY_ADDRESS", "VLLM_SPARSE_CPU_RAY",
                 "VLLM_USE_RAY_V2_EXECUTOR_BACKEND"):
        env.pop(name, None)
    if backend == "ray":
        env["VLLM_SPARSE_CPU_RAY"] = "1"
        env["VLLM_USE_RAY_V2_EXECUTOR_BACKEND"] = "1" if ray_executor == "v2" else "0"
    args = [sys.executable, "-c", SCRIPT, model, json.dumps(METHODS["radar"]), str(tp), backend]
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


@pytest.fixture(scope="module")
def mp_tp1(tiny_model):
    result = _run(tiny_model, 1, "mp")
    assert result["facts"] == [["CpuPlatform", None]]
    return result


# TP=2 through both of vLLM's Ray executors: RayExecutorV2 (the default) and the legacy
# RayDistributedExecutor (Ray compiled graph). (TP=1 through Ray also passes; it is left out
# of CI to save its two minutes.)
@pytest.mark.parametrize("tp, ray_executor", [(2, "v2"), (2, "legacy")])
def test_ray_executor_equals_mp(tiny_model, mp_tp1, tp, ray_executor):
    got = _run(tiny_model, tp, "ray", ray_executor)
    assert got["tokens"] == mp_tp1["tokens"]
    assert len(got["facts"]) == tp and len({actor for _, actor in got["facts"]}) == tp
    for platform, actor in got["facts"]:     # each rank is its own Ray actor
        assert platform == "RayCpuPlatform" and actor
    (one,) = mp_tp1["stats"]
    for rank in got["stats"]:
        for kv_heads, queries, attended, context in rank:
            assert kv_heads == 2 // tp
            assert queries > 0 and attended < 0.75 * context   # sparse, in the actor
    for layer, (_, _, attended, _) in enumerate(one):  # ranks' attended tokens add up
        assert sum(rank[layer][2] for rank in got["stats"]) == attended
