# SPDX-License-Identifier: Apache-2.0
"""The issue's measurement grid, and which of its cells each method has on each device.

The grid (issue "Quality and speed benchmarks"):
- perplexity: contexts 1K, 2K, 4K, 7.5K × budgets 12.5%, 25%, 50% of the context;
- tasks: contexts 2K, 4K, 7.5K × the same budgets, at least 32 samples per cell;
- decode speed: contexts 2K, 4K, 7.5K × batch 1 and 8, next to dense in the same run.

Dense has one cell per context (no budget); NAtS, whose budget is learned, one per context
too (quality.py runs it once per cell). A task cell is measured for dense when it ran every
task at that context with enough samples, and for a sparse method when it ran, with enough
samples, every task that dense kept there (dense at least --min-dense); dense keeping no task
leaves nothing to run, and the cell counts as measured ("n/a" in the detail). A cell measured
with fewer samples than the grid asks is listed as such, not as measured.
"""

from report_tables import DASH, LEARNED, cell_samples, methods_of, pct
from tasks import TASKS

PPL_CONTEXTS = (1024, 2048, 4096, 7680)
TASK_CONTEXTS = (2048, 4096, 7680)
SPEED_CONTEXTS = (2048, 4096, 7680)
FRACTIONS = (0.125, 0.25, 0.5)
BATCHES = (1, 8)
MIN_SAMPLES = 32
MIN_DENSE = 0.8


def _budgets(method: str, rows: list[dict]) -> tuple:
    """The budget axis of a method: none for dense, "learned" for a method run that way."""
    if method == "dense":
        return (None,)
    if any(r.get("budget") == LEARNED for r in rows if r["method"] == method):
        return (LEARNED,)
    return FRACTIONS


def _budget_of(row):
    if row["method"] == "dense":
        return None
    return LEARNED if row.get("budget") == LEARNED else round(row["fraction"], 4)


def perplexity_cells(run: dict, method: str) -> dict[tuple, str]:
    """(context, budget) -> "measured" / "missing" for one quality run."""
    rows = [r for r in run.get("rows", []) if r["kind"] == "perplexity"]
    have = {(r["context"], _budget_of(r)) for r in rows if r["method"] == method}
    return {(c, b): "measured" if (c, b) in have else "missing"
            for c in PPL_CONTEXTS for b in _budgets(method, rows)}


def kept_tasks(run: dict, context: int) -> list[str]:
    """The tasks dense kept at `context` (scored at least the run's --min-dense)."""
    min_dense = (run.get("settings") or {}).get("min_dense", MIN_DENSE)
    return [r["task"] for r in run.get("rows", []) if r["kind"] == "task"
            and r["method"] == "dense" and r["context"] == context and r["score"] >= min_dense]


def task_cells(run: dict, method: str) -> dict[tuple, str]:
    """(context, budget) -> "measured" / "n/a" / "few samples" / "missing"."""
    rows = [r for r in run.get("rows", []) if r["kind"] == "task"]
    dense = {(r["task"], r["context"]): r for r in rows if r["method"] == "dense"}
    out = {}
    for c in TASK_CONTEXTS:
        needed = kept_tasks(run, c)
        dense_done = all((t, c) in dense for t in TASKS)
        for b in _budgets(method, rows):
            if method == "dense":
                got = [dense[(t, c)] for t in TASKS if (t, c) in dense]
                full = dense_done
            else:
                at = {r["task"]: r for r in rows if r["method"] == method
                      and r["context"] == c and _budget_of(r) == b}
                got = [at[t] for t in needed if t in at]
                full = dense_done and len(got) == len(needed)
            if full and not got:
                out[(c, b)] = "n/a"
            elif full and all((cell_samples(r) or 0) >= MIN_SAMPLES for r in got):
                out[(c, b)] = "measured"
            elif got:
                out[(c, b)] = "few samples" if full else "partial"
            else:
                out[(c, b)] = "missing"
    return out


def speed_cells(run: dict, method: str) -> dict[tuple, str]:
    """(context, batch) -> "measured" / "missing" (a row counts only with dense's beside it)."""
    rows = run.get("rows", [])
    dense = {(r["context"], r["batch"]) for r in rows if r["method"] == "dense"}
    have = {(r["context"], r["batch"]) for r in rows if r["method"] == method} & dense
    return {(c, b): "measured" if (c, b) in have else "missing"
            for c in SPEED_CONTEXTS for b in BATCHES}


def _axis_text(value) -> str:
    if value is None:
        return ""
    if value == LEARNED:
        return "learned"
    return pct(value) if isinstance(value, float) else f"batch {value}"


def summary(cells: dict[tuple, str]) -> str:
    """"k of n", then the cells not measured grouped by context, e.g.
    "4 of 12; missing 1,024 (all), 7,680 (12.5%, 50%); few samples 2,048 (25%)"."""
    done = sum(s in ("measured", "n/a") for s in cells.values())
    text = f"{done} of {len(cells)}"
    for status in ("missing", "partial", "few samples"):
        per_context: dict[int, list] = {}
        for (c, b), s in cells.items():
            if s == status:
                per_context.setdefault(c, []).append(b)
        if not per_context:
            continue
        parts = []
        for c, axis in per_context.items():
            total = sum(1 for cc, _ in cells if cc == c)
            names = [x for x in map(_axis_text, axis) if x]
            inner = "" if total == 1 else "all" if len(axis) == total else ", ".join(names)
            parts.append(f"{c:,}" + (f" ({inner})" if inner else ""))
        text += f"; {status} {', '.join(parts)}"
    return text


def grid_rows(results: dict[str, list[dict]], methods: tuple[str, ...]) -> list[list[str]]:
    """One row per (device, method): device, method, and the summary of each grid."""
    devices = []
    for bench in ("quality", "speed"):
        devices += [run.get("device", "?") for run in results.get(bench, [])
                    if run.get("device", "?") not in devices]
    out = []
    for device in devices:
        quality = next((r for r in results.get("quality", []) if r.get("device") == device), None)
        speed = next((r for r in results.get("speed", []) if r.get("device") == device), None)
        found = set()
        for run in (quality, speed):
            found |= {r["method"] for r in (run or {}).get("rows", [])}
        for m in methods_of([{"method": m} for m in set(methods) | found]):
            out.append([device, m,
                        summary(perplexity_cells(quality, m)) if quality else DASH,
                        summary(task_cells(quality, m)) if quality else DASH,
                        summary(speed_cells(speed, m)) if speed else DASH])
    return out
