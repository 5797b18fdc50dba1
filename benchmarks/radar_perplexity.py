# SPDX-License-Identifier: Apache-2.0
"""Radar's perplexity next to dense, on SmolLM2-135M and CPython's pydoc text.

    python benchmarks/radar_perplexity.py [--context 4096] [--windows 4] [--budget 0.25] [--small]

Dense is vLLM's own backend (CPU_ATTN on CPU). Radar runs in evaluation mode
(`eval_sparse_prefill_from=P`, P = --score-from, default half the context): every prompt
position >= P attends exactly as a decode step at that position would
(tests/e2e/test_radar_smollm2.py checks this against real decoding), so every scored
log-prob measures the sparse policy. Both score the positions >= P of the same token
windows (the budget fraction applies to each position's own context). Results go to
benchmarks/results/radar_perplexity[_small].json (a list of runs, one per device; another
device's run is kept).
"""

import argparse
import datetime
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

RESULTS = Path(__file__).resolve().parent / "results"

from results_io import command_line, save_run  # noqa: E402


def windows(model: str, context: int, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from vllm_sparse.models import long_text

    ids = AutoTokenizer.from_pretrained(model)(long_text())["input_ids"]
    stride = (len(ids) - context) // max(1, count)
    return [ids[i * stride: i * stride + context] for i in range(count)]


def perplexity(model: str, backend: str, sparse: dict, prompts: list[list[int]],
               score_from: int) -> dict:
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=model, dtype="float32", max_model_len=8192, block_size=32, seed=0,
              enforce_eager=True, attention_backend=backend,
              additional_config={"vllm_sparse": sparse} if sparse else {})
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    seconds = time.perf_counter() - start
    nll, count = 0.0, 0
    for prompt, out in zip(prompts, outs):
        for pos in range(score_from + 1, len(prompt)):
            nll -= out.prompt_logprobs[pos][prompt[pos]].logprob
            count += 1
    del llm
    return {"ppl": math.exp(nll / count), "scored_tokens": count, "seconds": seconds}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--score-from", type=int, default=None,
                        help="first scored position, sparse from there (default: context / 2)")
    parser.add_argument("--small", action="store_true", help="one 2K window (for CI)")
    args = parser.parse_args()
    if args.small:
        args.context, args.windows = 2048, 1
    score_from = args.context // 2 if args.score_from is None else args.score_from

    import torch
    import vllm

    from vllm_sparse.models import smollm2_dir

    model = str(smollm2_dir())
    prompts = windows(model, args.context, args.windows)
    dense = perplexity(model, "auto", {}, prompts, score_from)
    radar = perplexity(model, "radar", {"budget": args.budget,
                                        "eval_sparse_prefill_from": score_from}, prompts, score_from)
    print(f"\nSmolLM2-135M, pydoc text, {args.windows} x {args.context} tokens, positions "
          f">= {score_from} scored, float32")
    print(f"{'method':<10}{'budget':>10}{'perplexity':>12}{'vs dense':>10}{'seconds':>10}")
    print(f"{'dense':<10}{'all':>10}{dense['ppl']:>12.3f}{1.0:>10.3f}{dense['seconds']:>10.1f}")
    ratio = radar["ppl"] / dense["ppl"]
    print(f"{'radar':<10}{args.budget:>10}{radar['ppl']:>12.3f}{ratio:>10.3f}"
          f"{radar['seconds']:>10.1f}")
    RESULTS.mkdir(exist_ok=True)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {_cpu_model()}, {os.cpu_count()} cores",
        "device": "cpu", "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "model": "SmolLM2-135M-Instruct", "text": "pydoc_data.topics", "command": command_line(),
        "context": args.context, "windows": args.windows, "budget": args.budget,
        "score_from": score_from,
        "dense": dense, "radar": radar, "radar_over_dense": ratio,
    }
    name = "radar_perplexity_small.json" if args.small else "radar_perplexity.json"
    save_run(RESULTS / name, record)  # keeps other devices' runs


if __name__ == "__main__":
    main()
