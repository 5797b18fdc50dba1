# SPDX-License-Identifier: Apache-2.0
"""Fills the issue's measurement grid a piece at a time: runs only the cells this device's
stored results lack, each as a `quality.py --merge` or `speed.py --merge` job, cheapest first,
until a time budget is spent; then re-renders BENCHMARKS.md.

    python benchmarks/fill_grid.py --dry-run           # the plan, with estimated minutes
    python benchmarks/fill_grid.py --hours 2           # run jobs for up to about 2 hours
    python benchmarks/fill_grid.py --hours 8 --only quality

The grid and what counts as measured are `report_grid`'s. Each job merges its rows into the
stored run as soon as it ends, so an interrupted fill loses at most the job running, and the
next fill goes on from there. The plan is recomputed after every job, because a task cell of
a sparse method depends on what dense scored at that context (dense runs every task first;
only the tasks dense keeps are run for the others). Perplexity jobs reuse the stored dense row
of their context (its number of windows); a context without one gets a dense job first.

Costs are estimates fitted to this session's runs on the 2-core CPU (a prompt of C tokens costs
about 15 s × (C / 4096)^1.5 for dense, NAtS's prefill about 2.5× that and SparseK's (its Numba
prefill rule, since 2026-12-07) about 1.8× (1× to 2.6× from budget 12.5% to 50%); a perplexity
window in evaluation mode (Radar, StreamingLLM, Recycled) about 1 + 1.5 C / 4096 times a dense
one, Recycled's 1.6× more), used to order the jobs and to stop before one would overrun
--hours; the jobs' real durations are printed. A dense task job runs only the tasks whose dense
cell is missing or short of samples, and is estimated at every sample of each, an upper bound:
quality.py stops a task once dense cannot reach the filter.
"""

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report_grid as grid  # noqa: E402
from quality import METHODS as QUALITY_METHODS  # noqa: E402
from results_io import read_runs  # noqa: E402

ROOT = HERE.parent
METHODS = tuple(m for m in QUALITY_METHODS if m != "dense")   # sparse methods, dense apart
WINDOWS = 2                 # perplexity windows per context when dense has none stored yet
TOKENS = 32                 # speed.py's decode tokens
PREFILL_FACTOR = {"nats": 2.5, "sparsek": 1.8}   # NAtS: SDPA prefill since 2026-11-24
EVAL_MODE_FACTOR = {"radar": 1.0, "streaming": 1.0, "recycled": 1.6}   # × (1 + 1.5 C / 4096)
ENGINE_START_S = 25.0


def prompt_s(context: int, method: str = "dense") -> float:
    """Estimated seconds for one prompt of `context` tokens on the 2-core CPU."""
    return 15.0 * (context / 4096) ** 1.5 * PREFILL_FACTOR.get(method, 1.0)


def window_s(context: int, method: str) -> float:
    """Estimated seconds for one perplexity window (evaluation mode from C / 2 where used)."""
    if method in EVAL_MODE_FACTOR:
        return prompt_s(context) * (1 + 1.5 * context / 4096) * EVAL_MODE_FACTOR[method]
    return prompt_s(context, method)


@dataclass
class Job:
    """One benchmark invocation that fills some grid cells."""

    bench: str                       # "quality" or "speed"
    argv: list[str]                  # arguments after the script
    cells: str                       # what it fills, for the plan
    estimate_s: float

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / f"{self.bench}.py"), *self.argv]


def _fractions(cells: dict, context: int, statuses=("missing",)) -> list:
    return [b for (c, b), s in cells.items() if c == context and s in statuses]


def _quality(methods, ppl=(), tasks=(), task_contexts=(), fractions=(0.25,), windows=WINDOWS,
             samples=grid.MIN_SAMPLES) -> list[str]:
    resize = ["--replace-cells"] if "dense" in methods else []   # e.g. 16 stored samples -> 32
    return ["--methods", ",".join(methods), "--merge", *resize,
            "--ppl-contexts", ",".join(map(str, ppl)), "--windows", str(windows),
            "--task-contexts", ",".join(map(str, task_contexts)),
            "--tasks", ",".join(tasks), "--samples", str(samples),
            "--fractions", ",".join(f"{f:g}" for f in fractions)]


def quality_jobs(run: dict | None) -> list[Job]:
    """The quality jobs runnable now (a sparse job only once dense's cell is there)."""
    run = run or {"rows": []}
    rows = run.get("rows", [])
    jobs = []
    dense_ppl = {r["context"]: r for r in rows
                 if r["kind"] == "perplexity" and r["method"] == "dense"}
    for c in grid.PPL_CONTEXTS:
        if c not in dense_ppl:
            jobs.append(Job("quality", _quality(["dense"], ppl=[c]), f"perplexity {c:,}: dense",
                            ENGINE_START_S + WINDOWS * prompt_s(c)))
            continue
        windows = dense_ppl[c].get("windows") or WINDOWS
        for m in METHODS:
            missing = _fractions(grid.perplexity_cells(run, m), c)
            if missing:
                fractions = [f for f in missing if isinstance(f, float)] or [0.25]  # learned
                jobs.append(Job(
                    "quality", _quality([m], ppl=[c], fractions=fractions, windows=windows),
                    f"perplexity {c:,}: {m} {_budgets(missing)}",
                    len(fractions) * (ENGINE_START_S + windows * window_s(c, m))))
    dense_tasks = grid.task_cells(run, "dense")
    for c in grid.TASK_CONTEXTS:
        if dense_tasks[(c, None)] != "measured":
            todo = dense_tasks_to_run(rows, c)
            jobs.append(Job("quality", _quality(["dense"], tasks=todo, task_contexts=[c]),
                            f"tasks {c:,}: dense, {_task_names(todo)}",
                            ENGINE_START_S + len(todo) * grid.MIN_SAMPLES * prompt_s(c)))
            continue
        kept = grid.kept_tasks(run, c)
        if not kept:
            continue
        for m in METHODS:
            todo = _fractions(grid.task_cells(run, m), c, ("missing", "partial", "few samples"))
            if todo:
                fractions = [f for f in todo if isinstance(f, float)] or [0.25]
                jobs.append(Job(
                    "quality", _quality([m], tasks=kept, task_contexts=[c], fractions=fractions),
                    f"tasks {c:,}: {m} {_budgets(todo)} ({', '.join(kept)})",
                    len(fractions) * (ENGINE_START_S + len(kept) * grid.MIN_SAMPLES
                                      * prompt_s(c, m))))
    return jobs


def dense_tasks_to_run(rows: list[dict], context: int) -> list[str]:
    """The tasks whose dense cell at `context` is missing or has fewer than MIN_SAMPLES samples
    (a cell dense stopped early counts as planned); the stored full cells are not rerun."""
    full = {r["task"] for r in rows if r["kind"] == "task" and r["method"] == "dense"
            and r["context"] == context
            and (grid.cell_samples(r) or 0) >= grid.MIN_SAMPLES}
    return [t for t in grid.TASKS if t not in full]


def _task_names(tasks) -> str:
    return f"all {len(tasks)} tasks" if len(tasks) == len(grid.TASKS) else ", ".join(tasks)


def speed_jobs(run: dict | None) -> list[Job]:
    """One job per (context, batch) cell some method lacks: speed.py --merge replaces whole
    cells, so every method runs again there, next to dense."""
    run = run or {"rows": []}
    todo = sorted({cell for m in ("dense", *METHODS)
                   for cell, s in grid.speed_cells(run, m).items() if s == "missing"})
    jobs = []
    for c, b in todo:
        estimate = sum(ENGINE_START_S + b * prompt_s(c, m) + TOKENS * 0.1 * b
                       for m in ("dense", *METHODS))
        jobs.append(Job("speed", ["--contexts", str(c), "--batches", str(b), "--merge",
                                  "--tokens", str(TOKENS)],
                        f"speed {c:,} batch {b}: all methods", estimate))
    return jobs


def _budgets(values) -> str:
    return ", ".join("learned" if v == "learned" else f"{v * 100:g}%" for v in values)


def plan(results: dict[str, list[dict]], device: str, only=("quality", "speed")) -> list[Job]:
    """Every job runnable now for `device`, cheapest first."""
    def run_of(bench):
        return next((r for r in results.get(bench, []) if r.get("device") == device), None)
    jobs = []
    if "quality" in only:
        jobs += quality_jobs(run_of("quality"))
    if "speed" in only:
        jobs += speed_jobs(run_of("speed"))
    return sorted(jobs, key=lambda j: j.estimate_s)


def load(device_results: Path) -> dict[str, list[dict]]:
    return {b: read_runs(device_results / f"{b}.json") for b in ("quality", "speed")}


def this_device() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=1.0, help="time budget (default 1)")
    p.add_argument("--only", default="quality,speed", help="quality, speed or both")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args()
    only = tuple(x for x in args.only.split(",") if x)
    if set(only) - {"quality", "speed"} or not only:
        p.error(f"--only {args.only!r}: allowed quality, speed or quality,speed")
    if args.hours <= 0:
        p.error(f"--hours {args.hours}: must be > 0")
    results_dir, device = HERE / "results", this_device()
    logs = results_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        jobs = plan(load(results_dir), device, only)
        for j in jobs:
            print(f"{j.estimate_s / 60:7.1f} min  {j.cells}\n"
                  f"             {shlex.join(['python', f'benchmarks/{j.bench}.py', *j.argv])}")
        print(f"{len(jobs)} jobs runnable now, about {sum(j.estimate_s for j in jobs) / 3600:.1f}"
              " h (sparse task jobs wait for dense's, so more follow)")
        return 0
    deadline, failed, done = time.monotonic() + args.hours * 3600, [], 0
    while True:
        jobs = [j for j in plan(load(results_dir), device, only) if j.cells not in failed]
        left = deadline - time.monotonic()
        job = next((j for j in jobs if j.estimate_s <= left), None)
        if job is None:
            print(f"stopping: {len(jobs)} jobs left, none fits the {left / 60:.0f} min left"
                  if jobs else "the grid is full for this device")
            break
        log = logs / f"fill_{time.strftime('%Y%m%d-%H%M%S')}_{job.bench}.log"
        print(f"[{done + 1}] {job.cells} (estimated {job.estimate_s / 60:.1f} min; log {log})",
              flush=True)
        start = time.monotonic()
        with open(log, "w") as out:
            rc = subprocess.run(job.command(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                check=False).returncode
        print(f"    {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
              f"{(time.monotonic() - start) / 60:.1f} min", flush=True)
        if rc:
            failed.append(job.cells)
        done += 1
    subprocess.run([sys.executable, str(HERE / "report.py")], cwd=ROOT, check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
