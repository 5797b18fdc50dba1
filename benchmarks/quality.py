# SPDX-License-Identifier: Apache-2.0
"""Quality of each sparse method next to dense attention, on SmolLM2-135M.

    python benchmarks/quality.py [--small] [--methods dense,radar,streaming,recycled,nats,sparsek]
                                 [--samples 32] [--format chat] [--tasks ...] [--merge]

Measures, through the real vLLM engine (`LLM(attention_backend=...)`), float32, KV block 32:
1. Perplexity on long real text: windows of C tokens of CPython's `pydoc_data.topics`
   (C = 1K, 2K, 4K, 7.5K), positions >= C/2 scored.
2. RULER-style synthetic tasks (`benchmarks/tasks.py`: single needle, multi-key needle,
   multi-value needle, variable tracking, common-word extraction) at C = 2K, 4K and 7.5K
   tokens, greedy decoding; score = fraction of expected answer items in the output, averaged
   over --samples prompts (32 in full mode) per cell. Dense runs every task first; only cells
   where dense scores >= --min-dense (80%) are run for the other methods (the filter is
   computed from this run's dense scores and printed). Dense stops a cell early, after a
   batch of prompts, once 80% is out of reach even if every sample left scored 1 (a score is
   at most 1): the cell is dropped either way, its row keeps the samples run and records
   `planned_samples` (--no-early-stop runs them all).

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
- nats: `attention_backend="nats"` with the gates of configs/smollm2-135m-instruct.yaml
  (configs/nats/, their sha256 recorded per row). NAtS has no budget: its learned token types
  decide what each KV head keeps, so it runs once per cell, its budget shown as "learned", next
  to the measured fraction of KV kept (below). No evaluation mode either (NatsConfig accepts
  `eval_sparse_prefill_from` but the NAtS backend never reads it, so it is not passed): NAtS
  prefill already attends, at every prompt position, exactly the live tokens the types leave
  visible there (`gates.visible`, the training contract), so every prompt log-prob already
  comes from the sparse policy, and needle answers are decoded by NAtS decode, which attends
  exactly the live tokens.
- sparsek: `attention_backend="sparsek"` with the scorer of configs/smollm2-135m-instruct.yaml
  (configs/sparsek/, sha256 recorded per row) at the same integer budget B (k = B - W, the
  window W from that file's `sparsek.window`: half the budget). Like NAtS it needs no evaluation mode: its prefill applies the SparseK rule (window +
  top-k by score, values scaled by p) at every prompt position, the same rule as its decode, so
  prompt log-probs come from the sparse policy. Its KV kept is measured like NAtS's (decode
  attends exactly the k kept tokens and the window).

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

KV kept (`kv_kept` in each row): the share of the context's KV tokens still held, averaged over
layers and KV heads. Dense, Radar, StreamingLLM (Radar's backend) and Recycled evict nothing:
1.0. NAtS: measured in the engine, on the very prompts scored, by the backend's attended-token
counters (`impl.stats`, as tests/e2e/test_nats.py counts them): NAtS decode attends exactly the
tokens still live, so attended / context tokens over a cell's decode steps, summed over layers
and KV heads, is the kept share. Perplexity windows are generated with max_tokens=2 for this,
so each window has one decode step, at position C, right after its last token (C + 1 tokens
of context); task cells count every decode step of every answer (the first at the prompt's
end, C tokens).

Attended (`attended_mean`, `attended_share` in each sparse row that has the backend's counters):
mean tokens attended per (query, KV head) over the cell's decode-like queries (decode steps,
and prompt positions in evaluation mode), and their share of each query's context. It proves
the sparse path ran, and shows what a budget bought: Radar attends up to a page below B (whole
pages), Recycled above B (its full steps attend the whole context).

Output: a table per cell (task, context, method, budget, score, vs dense, KV kept), and
benchmarks/results/quality[_small].json: a list of runs, each with device, machine, versions,
date, settings and rows; runs from another device already in the file are kept.

--merge: instead of replacing this device's run, merge this run's rows into it (it must have
the same model, dtype, --format and --seed, and the same --windows / --samples in every cell
that the stored run already has rows of, else the script stops before running anything; a
new cell, e.g. a new context, may use other windows or samples, shown per row). A row
replaces the stored row of the same cell (kind, task, context, method, budget fraction); the
others are kept, and the merge (command, date, machine, methods) is listed in the run's
`merged`. When dense is not among --methods, dense is not rerun: the
stored dense row of the same cell (same windows or samples) is the reference for "vs dense"
and for the task filter, and dense runs only for cells that have none. Every row's `vs_dense`
is recomputed from the merged run's dense rows. --replace-cells (with --merge and dense among
--methods) lets a stored cell be measured with other windows or samples: every stored row of
that cell, of any method, is dropped, and the other methods are run there again later.
"""

import argparse
import datetime
import gc
import hashlib
import math
import os
import platform
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))          # benchmarks/tasks.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # vllm_sparse

import report_grid as grid  # noqa: E402  (the issue's grid: the full mode's defaults)
from results_io import command_line, git_revision, save_run  # noqa: E402
from tasks import TASKS, TaskGenerator, score  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dense", "radar", "streaming", "recycled", "nats", "sparsek")
SINKS = 4  # StreamingLLM's attention sinks
LEARNED = "learned"        # the budget of a method whose learned gates decide what is kept
LEARNED_METHODS = ("nats",)
EVICTING_METHODS = ("nats", "sparsek")   # the others keep every KV token: kv_kept = 1.0
SPARSE_PREFILL_METHODS = ("nats", "sparsek")   # prefill already follows the policy: no eval mode
WEIGHTS = {"nats": ("gates", "gates_path"), "sparsek": ("scorer", "scorer_path")}
MERGE_SETTINGS = ("format", "seed")  # run-defining, must match to merge (cells: `cell_size`)


def set_environment() -> None:
    """Engine settings of this benchmark, set when it runs (not on import: tests import this
    module, and its settings must not leak into their engines)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keeps the progress bar readable
    # vLLM runs torch on one thread in-process unless OMP_NUM_THREADS is set (1.5x on 2 cores)
    os.environ.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 16)))


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true",
                   help="CI preset: one 1K perplexity window and 8 single-needle samples at 1K, "
                        "budget 25%%, methods dense,radar,streaming,nats,sparsek unless --methods is "
                        "given")
    p.add_argument("--methods", type=csv(str), default=None, help=f"default {','.join(METHODS)}")
    p.add_argument("--tasks", type=csv(str), default=list(TASKS))
    p.add_argument("--task-contexts", type=csv(int), default=list(grid.TASK_CONTEXTS))
    p.add_argument("--ppl-contexts", type=csv(int), default=list(grid.PPL_CONTEXTS))
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per context")
    p.add_argument("--samples", type=int, default=grid.MIN_SAMPLES, help="task samples per cell")
    p.add_argument("--fractions", type=csv(float), default=list(grid.FRACTIONS))
    p.add_argument("--format", choices=("plain", "chat"), default="chat")
    p.add_argument("--min-dense", type=float, default=grid.MIN_DENSE)
    p.add_argument("--no-early-stop", action="store_true",
                   help="run dense on every sample of a task cell even once the filter's "
                        "--min-dense is out of reach (by default dense stops there: the cell is "
                        "dropped either way)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--merge", action="store_true",
                   help="merge the rows into this device's run in --out instead of replacing it; "
                        "dense is reused from it unless --methods has dense (see above)")
    p.add_argument("--replace-cells", action="store_true",
                   help="with --merge and dense in --methods: cells stored with other windows or "
                        "samples are measured anew, and every stored row of them (any method) "
                        "is dropped")
    args = p.parse_args()
    if args.small:
        args.tasks, args.task_contexts, args.ppl_contexts = ["niah_single"], [1024], [1024]
        args.windows, args.samples, args.fractions = 1, 8, [0.25]
        args.methods = args.methods or ["dense", "radar", "streaming", "nats", "sparsek"]
    args.methods = args.methods or list(METHODS)
    if args.replace_cells and not (args.merge and "dense" in args.methods):
        p.error("--replace-cells needs --merge and dense among --methods (the new rows of a "
                f"replaced cell need dense's beside them); got --methods {','.join(args.methods)}"
                + ("" if args.merge else " without --merge"))
    unknown = set(args.methods) - set(METHODS) | set(args.tasks) - set(TASKS)
    if unknown:
        p.error(f"unknown method or task: {sorted(unknown)}; methods: {METHODS}, tasks: {TASKS}")
    args.out = args.out or RESULTS / ("quality_small.json" if args.small else "quality.json")
    return args


def sparse_config(method: str, budget: int | None, eval_from: int | None) -> tuple[str, dict]:
    """(attention backend, vllm_sparse config) of a sparse method at a token budget; a learned
    method (nats) takes neither budget nor evaluation mode: its gates come from configs/."""
    if method in LEARNED_METHODS:
        return method, {}
    if method in SPARSE_PREFILL_METHODS:
        return method, {"budget": budget}
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
        self.weights = self._weights(backend) if backend in WEIGHTS else None

    def _weights(self, method: str) -> dict:
        """The trained weights file the engine loaded (NAtS gates, SparseK scorer): its config
        key, path (relative to configs/ when inside) and sha256."""
        from vllm_sparse.config import config_dir

        key, getter = WEIGHTS[method]
        path = Path(self.llm.apply_model(lambda m: str(getattr(getattr(
            m.model.layers[0].self_attn.attn.impl.config, method), getter)()))[0])
        try:
            name = str(path.relative_to(config_dir()))
        except ValueError:
            name = str(path)
        return {"key": key, "path": name,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}

    def counts(self) -> tuple[int, int, int] | None:
        """(tokens attended, context tokens, queries) of decode-like queries so far (decode
        steps, and prompt positions in evaluation mode), summed over layers and KV heads, from
        vllm_sparse's attention counters; None for a backend without them."""
        try:
            per_layer = self.llm.apply_model(lambda m: [
                (layer.self_attn.attn.impl.stats.attended_tokens,
                 layer.self_attn.attn.impl.stats.context_tokens,
                 layer.self_attn.attn.impl.stats.queries) for layer in m.model.layers])[0]
        except Exception:  # noqa: BLE001 - vLLM's own backends have no counters
            return None
        return tuple(sum(layer[i] for layer in per_layer) for i in range(3))

    def generate(self, prompts, params):
        from vllm import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False)

    def close(self):
        del self.llm
        gc.collect()


def kv_kept(before: tuple | None, after: tuple | None) -> float | None:
    """Share of the context's KV tokens attended by the decode steps between two
    `Engine.counts()` readings (NAtS decode attends exactly the live tokens: the kept share)."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def attended(before: tuple | None, after: tuple | None) -> dict:
    """What the sparse path attended between two `Engine.counts()` readings: mean tokens per
    (query, KV head) and their share of the context; {} without counters or queries."""
    if before is None or after is None or after[2] == before[2]:
        return {}
    return {"attended_mean": (after[0] - before[0]) / (after[2] - before[2]),
            "attended_share": kv_kept(before, after)}


def measure_kept(engine, method: str, run) -> dict:
    """run() -> result dict, with `kv_kept` (and how it was obtained) added, and for a sparse
    method what its queries attended (`attended_mean`, `attended_share`: the proof its sparse
    path ran, and Recycled's real work, its full steps included)."""
    before = engine.counts()
    result = run()
    after = engine.counts()
    seen = attended(before, after) if method != "dense" else {}
    if method not in EVICTING_METHODS:
        return {**result, **seen, "kv_kept": 1.0, "kv_kept_source": "no eviction"}
    kept = kv_kept(before, after)
    if kept is None:
        raise RuntimeError(f"{method}: no attended-token counts from the engine; cannot measure "
                           "the KV kept fraction")
    return {**result, **seen, "kv_kept": kept,
            "kv_kept_source": "engine: attended / context tokens of the decode steps "
                              "(backend counters), all layers and KV heads"}


def run_perplexity(engine, windows, score_from, bar, decode_step=False) -> dict:
    """Perplexity of positions > score_from; `decode_step`: one decode step after each window
    (max_tokens=2) so the engine's decode counters see the window's last state (NAtS)."""
    from vllm import SamplingParams

    start, nll, count = time.perf_counter(), 0.0, 0
    params = SamplingParams(max_tokens=2 if decode_step else 1, prompt_logprobs=0,
                            ignore_eos=True)
    for window in windows:
        out = engine.generate([window], params)[0]
        for pos in range(score_from + 1, len(window)):
            nll -= out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
        bar.update(1)
    return {"score": math.exp(nll / count), "scored_tokens": count,
            "seconds": round(time.perf_counter() - start, 1)}


def run_tasks(engine, samples, batch, bar, stop_below: float | None = None) -> dict:
    """Greedy answers to `samples`, scored. `stop_below` (dense's task filter): stop once the
    cell's mean over all its samples can no longer reach it, even if every sample left scored
    1; the row then keeps the samples measured and records `planned_samples`."""
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
        left = len(samples) - len(scores)
        if left and stop_below is not None and filter_out_of_reach(scores, left, stop_below):
            bar.update(left)
            break
    result = {"score": sum(scores) / len(scores), "samples": len(scores),
              "seconds": round(time.perf_counter() - start, 1), "first_outputs": outputs[:3]}
    if len(scores) < len(samples):
        result["planned_samples"] = len(samples)
        result["stopped_early"] = (f"stopped after {len(scores)} of {len(samples)} samples: "
                                   f"at most {(sum(scores) + left) / len(samples):.3f} "
                                   f"reachable, below the filter's {stop_below:.0%}")
    return result


def filter_out_of_reach(scores: list[float], left: int, bar: float) -> bool:
    """True when a cell's mean over len(scores) + left samples stays below `bar` even if
    every one of the `left` samples still to run scores 1 (the best a sample can score)."""
    if any(not 0.0 <= s <= 1.0 for s in scores):
        raise ValueError(f"task scores must lie in [0, 1] for the early stop; got {scores}")
    return (sum(scores) + left) / (len(scores) + left) < bar


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
                     "vllm": vllm.__version__, "vllm_sparse": git_revision()},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": "SmolLM2-135M-Instruct", "dtype": dtype, "block_size": 32,
    }


def budget_text(row) -> str:
    if row["budget"] is None:
        return "all"
    if row["budget"] == LEARNED:
        return LEARNED
    return f"{row['fraction']:.1%}={row['budget']}"


def print_table(rows) -> None:
    """Rows of this run; a dense row reused from the stored run is marked "(stored)"."""
    print(f"\n{'kind':<11}{'task':<19}{'context':>8}  {'method':<10}{'budget':>12}"
          f"{'score':>9}{'vs dense':>10}{'kv kept':>9}{'seconds':>9}")
    for r in rows:
        vs = "" if r.get("vs_dense") is None else f"{r['vs_dense']:.3f}"
        kept = "" if r.get("kv_kept") is None else f"{r['kv_kept']:.3f}"
        print(f"{r['kind']:<11}{r.get('task') or 'pydoc':<19}{r['context']:>8}  "
              f"{r['method']:<10}{budget_text(r):>12}{r['score']:>9.3f}{vs:>10}{kept:>9}"
              f"{r['seconds']:>9.1f}" + ("  (stored)" if r.get("stored") else ""))


# ------------------------------------------------------------ merging into a stored run
def row_key(row) -> tuple:
    """The cell a row measures: kind, task, context, method, budget fraction (None: dense or
    a learned budget)."""
    return (row["kind"], row.get("task"), row["context"], row["method"], row.get("fraction"))


def dense_key(row) -> tuple:
    return (row["kind"], row.get("task"), row["context"])


def stored_run(path: Path, device: str) -> dict | None:
    from results_io import read_runs

    return next((r for r in read_runs(path) if r.get("device") == device), None)


def cell_size(row) -> tuple[str, int | None]:
    """What a row's score averages over: ("windows", n) for perplexity, ("samples", n) for tasks."""
    return ("windows", row.get("windows")) if row["kind"] == "perplexity" \
        else ("samples", grid.cell_samples(row))


def planned_sizes(settings: dict) -> dict[tuple, tuple[str, int]]:
    """(kind, task, context) -> the windows or samples this run's settings measure there."""
    planned = {("perplexity", None, c): ("windows", settings.get("windows"))
               for c in settings.get("ppl_contexts") or []}
    tasks, contexts = settings.get("tasks") or [], settings.get("task_contexts") or []
    planned.update({("task", t, c): ("samples", settings.get("samples"))
                    for t in tasks for c in contexts})
    return planned


def resized_cells(old: dict, settings: dict) -> set[tuple]:
    """The (kind, task, context) cells whose stored rows `settings` would measure with other
    windows or samples; --replace-cells drops every stored row of them (any method)."""
    planned = planned_sizes(settings)
    return {dense_key(r) for r in old.get("rows", [])
            if dense_key(r) in planned and cell_size(r) != planned[dense_key(r)]}


def check_mergeable(old: dict, settings: dict, dtype: str, model: str) -> None:
    """Raise ValueError unless a run with these settings may be merged into `old`: the same
    model, dtype, --format and --seed, and, in every cell this run measures that `old` has rows
    of, the same windows (perplexity) or samples (tasks). New cells may have their own; with
    --replace-cells and dense among the methods, so may stored cells (their rows are dropped)."""
    have = old.get("settings", {})
    diff = [f"{k} {have.get(k)!r} (stored) vs {settings.get(k)!r}" for k in MERGE_SETTINGS
            if have.get(k) != settings.get(k)]
    diff += [f"{k} {old.get(k)!r} (stored) vs {v!r}" for k, v in (("dtype", dtype),
                                                                   ("model", model))
             if old.get(k) != v]
    planned = planned_sizes(settings)
    if settings.get("replace_cells") and "dense" in (settings.get("methods") or []):
        planned = {}
    for r in old.get("rows", []):
        want = planned.get(dense_key(r))
        if want is not None and cell_size(r) != want:
            cell = dense_key(r)
            diff.append(f"{want[0]} {cell_size(r)[1]} (stored {cell[1] or cell[0]} at {cell[2]}) "
                        f"vs {want[1]}")
            planned.pop(cell)
    if diff:
        raise ValueError("cannot --merge into the stored run of device "
                         f"{old.get('device')!r}: {'; '.join(diff)}; use the stored settings, "
                         "or run without --merge to replace that run")


def stored_dense(old: dict | None) -> dict[tuple, dict]:
    """(kind, task, context) -> the stored dense row."""
    rows = (old or {}).get("rows", [])
    return {dense_key(r): r for r in rows if r["method"] == "dense"}


def _union(a, b) -> list:
    out = list(a or [])
    return out + [x for x in (b or []) if x not in out]


def merge_runs(old: dict | None, new: dict) -> dict:
    """`new`'s rows merged into `old` (same device and settings): a new row replaces the stored
    row of its cell, the rest are kept; settings' lists, the dense filter and notes are unions;
    `merged` lists each merge; every vs_dense is recomputed from the merged dense rows."""
    if old is None:
        return new
    check_mergeable(old, new["settings"], new["dtype"], new["model"])
    dropped = resized_cells(old, new["settings"]) if new["settings"].get("replace_cells") else set()
    rows = {row_key(r): r for r in old.get("rows", []) if dense_key(r) not in dropped}
    for r in new["rows"]:
        if not r.get("stored"):
            rows[row_key(r)] = r
    rows = sort_rows(rows.values())
    dense = {dense_key(r): r["score"] for r in rows if r["method"] == "dense"}
    for r in rows:
        ref = dense.get(dense_key(r))
        r["vs_dense"] = r["score"] / ref if ref else None
    settings = dict(old.get("settings", {}))
    for k, v in new["settings"].items():
        settings[k] = _union(settings.get(k), v) if isinstance(v, list) else settings.get(k, v)
    settings.pop("replace_cells", None)   # a property of one merge, not of the run
    filters = {(f["task"], f["context"]): f for f in old.get("dense_filter", [])}
    filters.update({(f["task"], f["context"]): f for f in new.get("dense_filter", [])})
    entry = {k: new.get(k) for k in ("date", "command", "machine", "versions",
                                     "omp_num_threads", "dense_backend")}
    entry["methods"] = sorted({r["method"] for r in new["rows"] if not r.get("stored")})
    entry["rows"] = sum(1 for r in new["rows"] if not r.get("stored"))
    return {**old, "settings": settings, "dense_filter": list(filters.values()),
            "notes": _union(old.get("notes"), new.get("notes")),
            "merged": [*old.get("merged", []), entry], "rows": rows}


def sort_rows(rows) -> list[dict]:
    return sorted(rows, key=lambda r: (r["kind"], r.get("task") or "", r["context"],
                                       r["method"] != "dense", r["method"], r["fraction"] or 0))


def main() -> None:
    set_environment()
    args = parse_args()
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_sparse.models import long_text, smollm2_dir

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    info = machine_info(dtype)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
    old = stored_run(args.out, info["device"]) if args.merge else None
    if old is not None:
        check_mergeable(old, settings, dtype, info["model"])   # before anything runs
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
    rows, notes, dense = [], [], {}

    # dense rows to reuse: --merge without dense in --methods, same cell, windows and samples
    reuse = {}
    if old is not None and "dense" not in args.methods:
        for key, r in stored_dense(old).items():
            same = (r.get("windows") == args.windows and r.get("score_from") == key[2] // 2
                    if key[0] == "perplexity" else grid.cell_samples(r) == args.samples)
            if same and ((key[2] in windows) if key[0] == "perplexity" else key[1:] in samples):
                reuse[key] = r
    dense_windows = {c: ws for c, ws in windows.items() if ("perplexity", None, c) not in reuse}
    dense_samples = {k: ss for k, ss in samples.items() if ("task", *k) not in reuse}
    for key, r in reuse.items():
        dense[key] = r["score"]
        rows.append({**r, "stored": True})
    if reuse:
        notes.append(f"dense not rerun by `{command_line()}`: its rows reuse the stored dense "
                     "rows (same windows/samples) of " + ", ".join(
                         f"{k[1] or k[0]} at {k[2]}" for k in reuse))

    def per_method(m):
        return 1 if m in LEARNED_METHODS else len(args.fractions)
    per_sparse = sum(per_method(m) for m in sparse)
    total = (sum(map(len, windows.values())) * per_sparse
             + sum(map(len, samples.values())) * per_sparse
             + sum(map(len, dense_windows.values())) + sum(map(len, dense_samples.values())))
    bar = tqdm(total=total, unit="prompt", dynamic_ncols=True)

    def add(row):
        ref = dense.get((row["kind"], row.get("task"), row["context"]))
        row["vs_dense"] = row["score"] / ref if ref else None
        rows.append(row)

    # dense first: the reference and the task filter
    dense_backend = old.get("dense_backend") if old is not None else None
    if dense_windows or dense_samples:
        bar.set_description("dense")
        engine = Engine(model, dtype, seed=args.seed)
        dense_backend = engine.backend
        for c, ws in dense_windows.items():
            res = measure_kept(engine, "dense", lambda: run_perplexity(engine, ws, c // 2, bar))
            dense[("perplexity", None, c)] = res["score"]
            add({"kind": "perplexity", "context": c, "method": "dense", "budget": None,
                 "fraction": None, "windows": len(ws), "score_from": c // 2,
                 "backend": engine.backend, **res})
        for (t, c), ss in dense_samples.items():
            res = measure_kept(engine, "dense", lambda: run_tasks(
                engine, ss, args.batch, bar, None if args.no_early_stop else args.min_dense))
            dense[("task", t, c)] = res["score"]
            add({"kind": "task", "task": t, "context": c, "method": "dense", "budget": None,
                 "fraction": None, "backend": engine.backend, **res})
        engine.close()
    kept = {k: v for k, v in samples.items() if dense[("task", *k)] >= args.min_dense}
    filter_rows = [{"task": t, "context": c, "dense": dense[("task", t, c)],
                    "kept": (t, c) in kept} for t, c in samples]
    for f in filter_rows:
        tqdm.write(f"dense filter: {f['task']:<18} {f['context']:>5}  dense {f['dense']:.3f}  "
                   f"{'kept' if f['kept'] else f'dropped (< {args.min_dense:.0%})'}"
                   + ("  (stored dense row)" if ("task", f["task"], f["context"]) in reuse
                      else ""))
    bar.total -= sum(len(samples[k]) for k in samples if k not in kept) * per_sparse
    bar.refresh()

    # sparse methods: one engine per (method, budget, evaluation start); a learned method
    # (nats: no budget, no evaluation mode) one engine for all its cells
    for method in sparse:
        learned = method in LEARNED_METHODS
        fractions = [None] if learned else args.fractions
        jobs = [("perplexity", c, f, ws) for c, ws in windows.items() for f in fractions]
        jobs += [("task", c, f, {t: ss for (t, cc), ss in kept.items() if cc == c})
                 for c in args.task_contexts for f in fractions]
        shared = None
        for i, (kind, c, f, work) in enumerate(jobs):
            if not work:
                continue
            budget = LEARNED if learned else int(f * c)
            eval_from = None if method in SPARSE_PREFILL_METHODS else (
                c // 2 if kind == "perplexity" else c - 1)
            backend, config = sparse_config(method, None if learned else budget, eval_from)
            bar.set_description(f"{method} {kind} {c} B={budget}")
            try:
                engine = shared or Engine(model, dtype, backend, config, seed=args.seed)
                shared = engine if learned else None
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
            if engine.weights:
                common[engine.weights["key"]] = {k: v for k, v in engine.weights.items()
                                                 if k != "key"}
            if kind == "perplexity":
                res = measure_kept(engine, method, lambda: run_perplexity(
                    engine, work, c // 2, bar, decode_step=method in EVICTING_METHODS))
                add({"kind": kind, "windows": len(work), "score_from": c // 2, **common, **res})
            else:
                for t, ss in work.items():
                    res = measure_kept(engine, method,
                                       lambda: run_tasks(engine, ss, args.batch, bar))
                    add({"kind": kind, "task": t, **common, **res})
            if not learned:
                engine.close()
        if shared is not None:
            shared.close()
    bar.close()

    rows = sort_rows(rows)
    print(f"\nSmolLM2-135M, {dtype}, dense = vLLM's {dense_backend}. Budgets are integer token "
          "counts int(f * context), the same for every method (sinks and window included); "
          "NAtS's is learned (its gates decide); NAtS's and SparseK's KV kept is measured in the "
          "engine.\nPerplexity: positions >= context/2 scored, sparse ones in evaluation mode "
          "(NAtS, SparseK: their sparse prefill) (score = perplexity, lower is better). Tasks: "
          "score = fraction of "
          f"answer items found (higher is better), {args.format} prompts, answers decoded "
          "sparsely. kv kept: share of KV tokens held (1.0: nothing evicted).")
    print_table(rows)
    for note in notes:
        print(note)
    run = {**info, "mode": "small" if args.small else "full",
           "command": command_line(), "settings": settings,
           "dense_backend": dense_backend,
           "budget_note": "integer token budgets int(f * context), equal for every method; "
                          "nats: learned (no budget), its kv_kept measured",
           "dense_filter": filter_rows, "notes": notes, "rows": rows}
    if old is not None:
        # the stored run as it is now (another --merge may have saved since this one started)
        run = merge_runs(stored_run(args.out, info["device"]) or old, run)
        print(f"merged into the stored {info['device']} run ({len(run['merged'])} merge(s)); "
              f"it now has {len(run['rows'])} rows")
    else:
        run["rows"] = [r for r in rows if not r.get("stored")]
    save_run(args.out, run)  # keeps other devices' runs
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
