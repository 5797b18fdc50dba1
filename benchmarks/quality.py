# SPDX-License-Identifier: Apache-2.0
"""Quality of each sparse method next to dense attention, on SmolLM2-135M.

    python benchmarks/quality.py [--small] [--methods dense,radar,streaming,recycled]
                                 [--samples 32] [--format chat] [--tasks ...]

Measures, through the real vLLM engine (`LLM(attention_backend=...)`), float32, KV block 32:
1. Perplexity on long real text: windows of C tokens of CPython's `pydoc_data.topics`
   (C = 1K, 2K, 4K, 7.5K), positions >= C/2 scored.
2. RULER-style synthetic tasks (`benchmarks/tasks.py`: single needle, multi-key needle,
   multi-value needle, variable tracking, common-word extraction) at C = 2K, 4K and 7.5K
   tokens, greedy decoding; score = fraction of expected answer items in the output, averaged
   over --samples prompts (32 in full mode) per cell. Dense runs every task first; only cells
   where dense scores >= --min-dense (80%) are run for the other methods (the filter is
   computed from this run's dense scores and printed).

Methods:
- dense: vLLM's own backend (no attention_backend given: CPU_ATTN on CPU, FLASH_ATTN on GPU),
  never vllm-sparse's dense path. The backend actually used is recorded.
- radar: `attention_backend="radar"`, hyperparameters from configs/ (1 sink, 64-token window).
- streaming (StreamingLLM, sinks + recent window): the radar backend with
  `{"budget": B, "radar": {"num_sink_tokens": 4, "local_window": B - 4}}`. Radar spends what
  the budget leaves after sinks and window on whole segments (RadarPolicy.select:
  spare = budget - sinks - window = 0, so k = 0 segments and no page is selected; the
  backend then attends exactly the sinks and the window), so this attends the first 4 and
  the last B - 4 tokens, B in all.
- recycled: `attention_backend="recycled"`; skipped with a note if the engine raises
  NotImplementedError at start-up.

Budgets: B = int(f * C) tokens for f in 12.5%, 25%, 50%, C the cell's context length, given
to every method as an integer, so all attend (at most) the same number of KV tokens per query
and KV head, sinks and window included. (benchmarks/radar_perplexity.py instead gives a
float budget, a fraction of each position's own context.)

Sparse methods run in evaluation mode (`eval_sparse_prefill_from=P`: prompt positions >= P
attend exactly as a decode step would, tests/e2e/test_radar_smollm2.py checks this):
- perplexity: P = C/2, so every scored log-prob comes from the sparse policy (B is f to 2f
  of the scored position's own context);
- tasks: every prompt is exactly C tokens and P = C - 1: the first C - 1 tokens are
  prefilled densely, as in serving, and the last prompt token and every answer token attend
  as decode steps, so the whole answer comes from sparse attention.

Output: a table per cell (task, context, method, budget, score, vs dense), and
benchmarks/results/quality[_small].json: a list of runs, each with device, machine, versions,
date, settings and rows; runs from another device already in the file are kept.
"""

import argparse
import datetime
import gc
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keeps the progress bar readable
# vLLM runs torch on one thread in-process unless OMP_NUM_THREADS is set (1.5x on 2 cores)
os.environ.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 16)))

sys.path.insert(0, str(Path(__file__).resolve().parent))          # benchmarks/tasks.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # vllm_sparse

from results_io import command_line, save_run  # noqa: E402
from tasks import TASKS, TaskGenerator, score  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dense", "radar", "streaming", "recycled")
SINKS = 4  # StreamingLLM's attention sinks


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true",
                   help="CI preset: one 1K perplexity window and 8 single-needle samples at 1K, "
                        "budget 25%%, methods dense,radar,streaming unless --methods is given")
    p.add_argument("--methods", type=csv(str), default=None, help=f"default {','.join(METHODS)}")
    p.add_argument("--tasks", type=csv(str), default=list(TASKS))
    p.add_argument("--task-contexts", type=csv(int), default=[2048, 4096, 7680])
    p.add_argument("--ppl-contexts", type=csv(int), default=[1024, 2048, 4096, 7680])
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per context")
    p.add_argument("--samples", type=int, default=32, help="task samples per cell")
    p.add_argument("--fractions", type=csv(float), default=[0.125, 0.25, 0.5])
    p.add_argument("--format", choices=("plain", "chat"), default="chat")
    p.add_argument("--min-dense", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.small:
        args.tasks, args.task_contexts, args.ppl_contexts = ["niah_single"], [1024], [1024]
        args.windows, args.samples, args.fractions = 1, 8, [0.25]
        args.methods = args.methods or ["dense", "radar", "streaming"]
    args.methods = args.methods or list(METHODS)
    unknown = set(args.methods) - set(METHODS) | set(args.tasks) - set(TASKS)
    if unknown:
        p.error(f"unknown method or task: {sorted(unknown)}; methods: {METHODS}, tasks: {TASKS}")
    args.out = args.out or RESULTS / ("quality_small.json" if args.small else "quality.json")
    return args


def sparse_config(method: str, budget: int, eval_from: int) -> tuple[str, dict]:
    """(attention backend, vllm_sparse config) of a sparse method at a token budget."""
    config = {"budget": budget, "eval_sparse_prefill_from": eval_from}
    if method == "streaming":
        config["radar"] = {"num_sink_tokens": SINKS, "local_window": budget - SINKS}
        return "radar", config
    return method, config


class Engine:
    """One LLM: dense (vLLM's backend) or a sparse method; freed by close()."""

    def __init__(self, model, dtype, backend=None, config=None, seed=0):
        from vllm import LLM

        kwargs = {"attention_backend": backend} if backend else {}
        if config:
            kwargs["additional_config"] = {"vllm_sparse": config}
        self.llm = LLM(model=model, dtype=dtype, max_model_len=8192, block_size=32, seed=seed,
                       enforce_eager=True, **kwargs)
        try:
            self.backend = self.llm.apply_model(
                lambda m: m.model.layers[0].self_attn.attn.attn_backend.get_name())[0]
        except Exception:  # noqa: BLE001 - informative only
            self.backend = backend or "auto"

    def generate(self, prompts, params):
        from vllm import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False)

    def close(self):
        del self.llm
        gc.collect()


def run_perplexity(engine, windows, score_from, bar) -> dict:
    from vllm import SamplingParams

    start, nll, count = time.perf_counter(), 0.0, 0
    for window in windows:
        out = engine.generate([window], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        for pos in range(score_from + 1, len(window)):
            nll -= out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
        bar.update(1)
    return {"score": math.exp(nll / count), "scored_tokens": count,
            "seconds": round(time.perf_counter() - start, 1)}


def run_tasks(engine, samples, batch, bar) -> dict:
    from vllm import SamplingParams

    start, scores, outputs = time.perf_counter(), [], []
    # the first prompt alone: the others then reuse its cached haystack prefix (the haystack
    # text is shared, only the needles differ), as vLLM's prefix caching does in serving
    chunks = [samples[:1]] + [samples[i: i + batch] for i in range(1, len(samples), batch)]
    for chunk in chunks:
        params = [SamplingParams(temperature=0, max_tokens=s.max_tokens) for s in chunk]
        for s, out in zip(chunk, engine.generate([s.prompt_ids for s in chunk], params)):
            scores.append(score(s.answers, out.outputs[0].text))
            outputs.append(out.outputs[0].text)
        bar.update(len(chunk))
    return {"score": sum(scores) / len(scores), "samples": len(scores),
            "seconds": round(time.perf_counter() - start, 1), "first_outputs": outputs[:3]}


def machine_info(dtype) -> dict:
    import torch
    import vllm

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "machine": f"{platform.platform()}; {platform.machine()} {cpu}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "vllm": vllm.__version__},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": "SmolLM2-135M-Instruct", "dtype": dtype, "block_size": 32,
    }


def print_table(rows) -> None:
    print(f"\n{'kind':<11}{'task':<19}{'context':>8}  {'method':<10}{'budget':>12}"
          f"{'score':>9}{'vs dense':>10}{'seconds':>9}")
    for r in rows:
        budget = "all" if r["budget"] is None else f"{r['fraction']:.1%}={r['budget']}"
        vs = "" if r.get("vs_dense") is None else f"{r['vs_dense']:.3f}"
        print(f"{r['kind']:<11}{r.get('task', 'pydoc'):<19}{r['context']:>8}  {r['method']:<10}"
              f"{budget:>12}{r['score']:>9.3f}{vs:>10}{r['seconds']:>9.1f}")


def main() -> None:
    args = parse_args()
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_sparse.models import long_text, smollm2_dir

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    model = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(model)
    text_ids = tokenizer(long_text())["input_ids"]
    windows = {}
    for c in args.ppl_contexts:
        stride = (len(text_ids) - c) // args.windows
        windows[c] = [text_ids[i * stride: i * stride + c] for i in range(args.windows)]
    generator = TaskGenerator(tokenizer, seed=args.seed, fmt=args.format)
    samples = {(t, c): generator.samples(t, c, args.samples)
               for t in args.tasks for c in args.task_contexts}
    sparse = [m for m in args.methods if m != "dense"]
    per_sparse = len(args.fractions) * len(sparse)
    total = (sum(map(len, windows.values())) * (1 + per_sparse)
             + sum(map(len, samples.values())) * (1 + per_sparse))
    bar = tqdm(total=total, unit="prompt", dynamic_ncols=True)
    rows, notes, dense = [], [], {}

    def add(row):
        ref = dense.get((row["kind"], row.get("task"), row["context"]))
        row["vs_dense"] = row["score"] / ref if ref else None
        rows.append(row)

    # dense first: the reference and the task filter
    bar.set_description("dense")
    engine = Engine(model, dtype, seed=args.seed)
    dense_backend = engine.backend
    for c, ws in windows.items():
        res = run_perplexity(engine, ws, c // 2, bar)
        dense[("perplexity", None, c)] = res["score"]
        add({"kind": "perplexity", "context": c, "method": "dense", "budget": None,
             "fraction": None, "windows": len(ws), "score_from": c // 2, "backend": engine.backend,
             **res})
    for (t, c), ss in samples.items():
        res = run_tasks(engine, ss, args.batch, bar)
        dense[("task", t, c)] = res["score"]
        add({"kind": "task", "task": t, "context": c, "method": "dense", "budget": None,
             "fraction": None, "backend": engine.backend, **res})
    engine.close()
    kept = {k: v for k, v in samples.items() if dense[("task", *k)] >= args.min_dense}
    filter_rows = [{"task": t, "context": c, "dense": dense[("task", t, c)],
                    "kept": (t, c) in kept} for t, c in samples]
    for f in filter_rows:
        tqdm.write(f"dense filter: {f['task']:<18} {f['context']:>5}  dense {f['dense']:.3f}  "
                   f"{'kept' if f['kept'] else f'dropped (< {args.min_dense:.0%})'}")
    bar.total -= sum(len(samples[k]) for k in samples if k not in kept) * per_sparse
    bar.refresh()

    # sparse methods: one engine per (method, budget, evaluation start)
    for method in sparse:
        jobs = [("perplexity", c, f, ws) for c, ws in windows.items() for f in args.fractions]
        jobs += [("task", c, f, {t: ss for (t, cc), ss in kept.items() if cc == c})
                 for c in args.task_contexts for f in args.fractions]
        for i, (kind, c, f, work) in enumerate(jobs):
            if not work:
                continue
            budget = int(f * c)
            eval_from = c // 2 if kind == "perplexity" else c - 1
            backend, config = sparse_config(method, budget, eval_from)
            bar.set_description(f"{method} {kind} {c} B={budget}")
            try:
                engine = Engine(model, dtype, backend, config, seed=args.seed)
            except NotImplementedError as exc:
                notes.append(f"{method}: skipped, NotImplementedError at start-up: {exc}")
                tqdm.write(notes[-1])
                bar.total -= sum(len(w) if isinstance(w, list) else sum(map(len, w.values()))
                                 for _, _, _, w in jobs[i:])
                bar.refresh()
                gc.collect()
                break
            common = {"context": c, "method": method, "budget": budget, "fraction": f,
                      "eval_sparse_prefill_from": eval_from, "config": config,
                      "backend": engine.backend}
            if kind == "perplexity":
                add({"kind": kind, "windows": len(work), "score_from": c // 2, **common,
                     **run_perplexity(engine, work, c // 2, bar)})
            else:
                for t, ss in work.items():
                    add({"kind": kind, "task": t, **common, **run_tasks(engine, ss, args.batch, bar)})
            engine.close()
    bar.close()

    rows.sort(key=lambda r: (r["kind"], r.get("task") or "", r["context"],
                             r["method"] != "dense", r["method"], r["fraction"] or 0))
    print(f"\nSmolLM2-135M, {dtype}, dense = vLLM's {dense_backend}. Budgets are integer token "
          "counts int(f * context), the same for every method (sinks and window included).\n"
          "Perplexity: positions >= context/2 scored, sparse ones in evaluation mode (score = "
          "perplexity, lower is better). Tasks: score = fraction of answer items found "
          f"(higher is better), {args.format} prompts, answers decoded sparsely.")
    print_table(rows)
    for note in notes:
        print(note)
    run = {**machine_info(dtype), "mode": "small" if args.small else "full",
           "command": command_line(),
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "dense_backend": dense_backend,
           "budget_note": "integer token budgets int(f * context), equal for every method",
           "dense_filter": filter_rows, "notes": notes, "rows": rows}
    save_run(args.out, run)  # keeps other devices' runs
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
