# SPDX-License-Identifier: Apache-2.0
"""End-to-end decode speed of every method next to dense, in one run, on the real engine.

    python benchmarks/speed.py [--contexts 2048,4096,7680] [--batches 1,8] [--tokens 32]
                               [--methods radar,recycled,streaming,nats,sparsek] [--budget 0.25]
                               [--small] [--merge]

Dense is vLLM's own backend (CPU_ATTN on CPU, FLASH_ATTN on CUDA). Each sparse method
gets the same token budget, `--budget` times the context. For each (context, batch):
time to first token (until every request of the batch has its first token) and decode
tokens/s (the tokens generated after that, over their time: decode steps only), from one
generation stepped through the engine, and the ratio to dense measured in the same run. SmolLM2-135M, float32 on CPU (bf16 GEMMs are slow on CPUs without AMX).
Results: benchmarks/results/speed[_small].json (rows of another device are kept).
--merge: keep this device's stored run and replace only the cells (context, batch) measured
now, every method of a cell coming from one run (ratios stay side by side); `merged` in the
run lists what was replaced by which command and date.
"""

import argparse
import gc
import os
import platform
import time
from pathlib import Path

import report_grid as grid  # noqa: E402  (the issue's grid: the defaults)
from results_io import command_line, git_revision, read_runs, save_run  # noqa: E402
from tqdm import tqdm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def sparse_config(method: str, budget: int) -> tuple[str, dict]:
    """(backend, vllm_sparse config) of a method at a token budget."""
    if method == "streaming":   # StreamingLLM: 4 sinks + recent window, no selected pages
        return "radar", {"budget": budget, "radar": {"num_sink_tokens": 4,
                                                     "local_window": budget - 4}}
    if method == "nats":        # learned token types: no budget
        return "nats", {}
    return method, {"budget": budget}


def merge_cells(old: dict | None, new: dict) -> dict:
    """`new`'s cells (context, batch) replace the same cells of the stored run `old`, all
    methods of a cell together; other cells of `old` are kept. Both must share tokens, model
    and dtype."""
    if old is None:
        return new
    for key in ("new_tokens", "model", "dtype"):
        if old.get(key) != new.get(key):
            raise ValueError(f"speed --merge: {key} {old.get(key)!r} (stored) vs {new.get(key)!r}; "
                             "rerun without --merge to replace the stored run")
    cells = {(r["context"], r["batch"]) for r in new["rows"]}
    rows = [r for r in old["rows"] if (r["context"], r["batch"]) not in cells] + new["rows"]
    rows.sort(key=lambda r: (r["method"] != "dense", r["method"], r["context"], r["batch"]))
    entry = {"date": new["date"], "command": new["command"], "cells": sorted(cells),
             "methods": sorted({r["method"] for r in new["rows"]}), "rows": len(new["rows"]),
             "versions": new.get("versions")}
    return {**old, "rows": rows, "merged": [*old.get("merged", []), entry]}


def prompts(model: str, context: int, batch: int):
    from transformers import AutoTokenizer
    from vllm import TokensPrompt

    from vllm_sparse.models import long_text

    ids = AutoTokenizer.from_pretrained(model)(long_text())["input_ids"]
    stride = (len(ids) - context) // max(1, batch)
    return [TokensPrompt(prompt_token_ids=ids[i * stride: i * stride + context])
            for i in range(batch)]


def measure(llm, batch, tokens: int) -> dict:
    """One timed generation of `tokens` tokens for the whole batch, step by step through the
    engine: TTFT = until every request has its first token (the batch's prefill), decode
    tokens/s = tokens generated after that over the time they took (decode steps only)."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    warm_up = TokensPrompt(prompt_token_ids=batch[0]["prompt_token_ids"][:64])
    llm.generate([warm_up], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
    counts = {}
    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.add_request(f"speed-{i}", prompt, params)
        counts[f"speed-{i}"] = 0
    first_all = first_count = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
        if first_all is None and min(counts.values()) >= 1:
            first_all, first_count = time.perf_counter(), sum(counts.values())
    end = time.perf_counter()
    decoded = sum(counts.values()) - first_count
    if decoded <= 0 or end <= first_all:
        raise RuntimeError(f"speed: no decode step measured ({counts})")
    return {"ttft_s": first_all - start, "decode_tok_s": decoded / (end - first_all),
            "decode_tokens": decoded}


def engine(model: str, backend: str | None, sparse: dict | None, max_len: int):
    from vllm import LLM

    kwargs = {"attention_backend": backend, "additional_config": {"vllm_sparse": sparse}} \
        if backend else {}
    # no prefix caching: every timed prefill computes its whole prompt
    return LLM(model=model, dtype="float32", max_model_len=max_len, enforce_eager=True, seed=0,
               max_num_seqs=16, enable_prefix_caching=False, **kwargs)


def main() -> None:
    # set when run (not on import: tests import this module)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--contexts", default=",".join(map(str, grid.SPEED_CONTEXTS)))
    parser.add_argument("--batches", default=",".join(map(str, grid.BATCHES)))
    parser.add_argument("--methods", default="radar,recycled,streaming,nats,sparsek")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--small", action="store_true", help="CI: 1K context, batch 2, 8 tokens")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the measured cells of this device's stored run")
    args = parser.parse_args()
    if args.small:
        args.contexts, args.batches, args.tokens = "1024", "2", 8
    import torch
    import vllm

    from vllm_sparse.models import smollm2_dir

    model = args.model or str(smollm2_dir())
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    methods = ["dense"] + [m for m in args.methods.split(",") if m]
    max_len = max(contexts) + args.tokens + 8
    inputs = {(c, b): prompts(model, c, b) for c in contexts for b in batches}
    rows = []
    bar = tqdm(total=len(methods) * len(contexts) * len(batches), desc="speed")
    for method in methods:
        llm = engine(model, None, None, max_len) if method == "dense" else None
        for context in contexts:
            budget = int(args.budget * context)
            if method != "dense":      # the budget is in the engine's config
                llm = engine(model, *sparse_config(method, budget), max_len)
            for batch in batches:
                bar.set_postfix(method=method, context=context, batch=batch)
                rows.append({"method": method, "context": context, "batch": batch,
                             "budget": None if method in ("dense", "nats") else budget,
                             **measure(llm, inputs[(context, batch)], args.tokens)})
                bar.update()
            if method != "dense":
                del llm
                gc.collect()
        llm = None
        gc.collect()
    bar.close()
    dense = {(r["context"], r["batch"]): r for r in rows if r["method"] == "dense"}
    print(f"\n{'method':<11}{'context':>8}{'batch':>6}{'budget':>8}{'TTFT s':>9}"
          f"{'decode tok/s':>14}{'vs dense':>10}")
    for r in rows:
        ref = dense[(r["context"], r["batch"])]
        r["decode_vs_dense"] = r["decode_tok_s"] / ref["decode_tok_s"]
        print(f"{r['method']:<11}{r['context']:>8}{r['batch']:>6}{str(r['budget'] or '-'):>8}"
              f"{r['ttft_s']:>9.2f}{r['decode_tok_s']:>14.1f}{r['decode_vs_dense']:>9.2f}x")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = {"date": time.strftime("%Y-%m-%d"), "device": device,
              "machine": f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores",
              "cores": os.cpu_count(), "vllm": vllm.__version__, "torch": torch.__version__,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "vllm": vllm.__version__, "vllm_sparse": git_revision()},
              "mode": "small" if args.small else "full", "command": command_line(),
              "settings": vars(args),
              "model": "SmolLM2-135M-Instruct", "dtype": "float32", "new_tokens": args.tokens,
              "rows": rows}
    path = RESULTS / f"speed{'_small' if args.small else ''}.json"
    if args.merge:
        stored = [r for r in read_runs(path) if r.get("device") == device]
        record = merge_cells(stored[0] if stored else None, record)
    save_run(path, record)  # keeps other devices' runs
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
