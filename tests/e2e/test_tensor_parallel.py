# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism on the CPU engine (mp executor, two worker processes): TP=2 gives
the output of TP=1 for every method, each rank attending sparsely over its own KV head
(SparseK also freeing pages on both ranks at once).

Each rank selects for the KV heads it holds and no collective is added, so decisions
(Radar's page top-k, Recycled's refresh schedule and recycled tokens) are the same as in
one process. vLLM's CPU workers need `VLLM_CPU_OMP_THREADS_BIND="0|1"` on a 2-core,
one-NUMA-node machine."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

METHODS = {
    "radar": {"budget": 64, "radar": {"local_window": 32}},
    "recycled": {"budget": 64, "recycled": {"check_every": 2, "similarity_threshold": 0.95}},
    "sparsek": {"budget": 80},            # + the scorer file (`_config`); evicts pages
}
PROMPT_SLICES = [(0, 900), (30000, 30500)]     # two prompts from long_text()
MAX_TOKENS = 24
SCRIPT = r"""
import json, sys
from vllm import LLM
from tests.e2e.test_tensor_parallel import generate

model, method, sparse = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=2048,
          tensor_parallel_size=2, attention_backend=method,
          additional_config={"vllm_sparse": sparse})
print("RESULT" + json.dumps(generate(llm)))
"""

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def generate(llm) -> dict:
    """Greedy tokens of the two prompts and every rank's `layer_stats`."""
    from vllm import SamplingParams

    from vllm_sparse.models import long_text

    text = long_text()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([text[a:b] for a, b in PROMPT_SLICES], params, use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "stats": llm.apply_model(layer_stats)}


def layer_stats(model):
    """Per layer on one rank: (KV heads held, decode queries, tokens attended, context)."""
    impls = [layer.self_attn.attn.impl for layer in model.model.layers]
    return [(i.num_kv_heads, i.stats.queries, i.stats.attended_tokens, i.stats.context_tokens)
            for i in impls]


def _config(method, tmp_path) -> dict:
    """The method's config; SparseK gets tests/e2e/test_sparsek.py's random scorer (k = 48,
    window 32), whose decisions are per KV head, so each rank keeps its head's slots and the
    eviction channel ANDs the ranks' pages."""
    config = dict(METHODS[method])
    if method == "sparsek":
        from tests.e2e.test_sparsek import random_scorer

        path = tmp_path / "scorer.safetensors"
        random_scorer().save(path)
        config["sparsek"] = {"scorer": str(path)}
    return config


def _run_tp2(model, method, config):
    """TP=2 in a subprocess: the mp executor's two workers, one core each."""
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1",   # apply_model pickles the function
               PYTHONPATH=ROOT)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, model, method,
                           json.dumps(config)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tp2_equals_tp1(tiny_model, tp1_run, method, tmp_path):
    one, two = tp1_run(method), _run_tp2(tiny_model, method, _config(method, tmp_path))
    assert two["tokens"] == one["tokens"]
    assert len(two["stats"]) == 2                       # two ranks
    for rank in two["stats"]:
        for kv_heads, queries, attended, context in rank:
            assert kv_heads == 1                        # the tiny model's 2 KV heads, split
            assert queries > 0 and attended < 0.75 * context
    # per-rank attended tokens add up to the single process's
    for layer in range(len(one["stats"][0])):
        assert sum(rank[layer][2] for rank in two["stats"]) == one["stats"][0][layer][2]
