# SPDX-License-Identifier: Apache-2.0
"""Renders benchmarks/results/*.json and benchmarks/notes/*.md into BENCHMARKS.md and its plots.

Every run in a results file is shown, one device after another, each with its machine,
versions, date and command; so GPU rows stay in the report whatever a CPU rerun replaces.
The notes are hand-written markdown, included verbatim in fixed places.
"""

import os
import re
from pathlib import Path

import report_grid
import report_plots
import report_tables as tables
import report_targets
from results_io import read_runs

BENCHES = ("quality", "speed", "load", "radar_perplexity")
RUN_METHODS = ("dense", "radar", "recycled", "streaming", "nats", "sparsek")  # `report.py --run` measures
STATUS = {"hit": "**hit**", "missed": "**missed**", "not measured": "not measured"}


def load_results(results_dir: Path, small: bool) -> dict[str, list[dict]]:
    """bench -> its runs, from the full-mode files or, with `small`, the *_small.json ones."""
    suffix = "_small" if small else ""
    return {b: read_runs(Path(results_dir) / f"{b}{suffix}.json") for b in BENCHES}


def note(notes_dir: Path | None, name: str) -> str:
    path = notes_dir / f"{name}.md" if notes_dir else None
    return path.read_text().strip() + "\n" if path and path.exists() else ""


def _cell_text(target, cell) -> str:
    size = "batch" if target.bench == "speed" else "budget"
    amount = cell[1] if size == "batch" else tables.pct(cell[1])
    return f"context {cell[0]:,}, {size} {amount}"


def targets_section(results: dict) -> str:
    rows = []
    for r in report_targets.classify_all(results):
        t = r["target"]
        value = near = tables.DASH
        if r["value"]:
            value = f"{r['value'][0]:.3f} ({r['value'][1]})"
        if r["nearest"]:
            cell, ratio, source = r["nearest"]
            would = "would pass" if t.passes(ratio) else "would miss"
            near = f"{_cell_text(t, cell)}: {ratio:.3f} ({source}; {would})"
        rows.append([t.name, t.want, _cell_text(t, t.cell), r["device"] or "none measured",
                     STATUS[r["status"]], value, near])
    header = ["target", "pass if", "cell", "device", "status", "measured", "nearest measured cell"]
    return (tables.table(header, rows) + "\n\nValues are ratios to dense in the same run. Needle "
            f"accuracy: mean score over {', '.join(report_targets.NEEDLE_TASKS)} (those dense "
            "kept), divided by dense's mean over the same tasks. A cell that was not run is "
            "\"not measured\", never a pass or a failure; the nearest measured cell shows where "
            "the method stands.\n")


def run_methods(bench: str, run: dict) -> set[str]:
    if bench == "load":
        return set(run.get("runs", {}))
    if bench == "radar_perplexity":
        return {"dense", "radar"}
    return {r["method"] for r in run.get("rows", [])}


def coverage_section(results: dict) -> str:
    """Which device measured each method in each benchmark; the methods that
    `report.py --run` measures are listed even when nothing measured them."""
    benches = ("quality", "radar_perplexity", "speed", "load")
    found = {b: {} for b in benches}
    for bench in benches:
        for run in results[bench]:
            for m in run_methods(bench, run):
                found[bench].setdefault(m, []).append(run.get("device", "?"))
    methods = tables.methods_of([{"method": m} for m in set(RUN_METHODS).union(*found.values())])
    rows = [[m, *(", ".join(found[b].get(m, [])) or "not measured" for b in benches)]
            for m in methods]
    return tables.table(["method", *benches], rows) + "\n"


def grid_section(results: dict) -> str:
    """Which cells of the issue's grid each method has, per device (report_grid)."""
    header = ["device", "method", "perplexity (context × budget)",
              f"tasks (context × budget, ≥ {report_grid.MIN_SAMPLES} samples)",
              "decode speed (context × batch)"]
    rows = report_grid.grid_rows(results, RUN_METHODS)
    if not rows:
        return "Nothing measured yet.\n"
    return (tables.table(header, rows) + "\n\nThe grid: perplexity at "
            + ", ".join(f"{c:,}" for c in report_grid.PPL_CONTEXTS) + "; tasks at "
            + ", ".join(f"{c:,}" for c in report_grid.TASK_CONTEXTS) + "; budgets "
            + ", ".join(tables.pct(f) for f in report_grid.FRACTIONS)
            + " (dense: none; NAtS: learned, one cell per context); decode speed at "
            + ", ".join(f"{c:,}" for c in report_grid.SPEED_CONTEXTS) + " × batch "
            + " and ".join(map(str, report_grid.BATCHES)) + ". A task cell needs every task "
            f"dense kept (dense ≥ {tables.pct(report_grid.MIN_DENSE)}) at that context; \"n/a\": dense kept none; \"partial\": "
            "some of them; \"few samples\": all, with fewer samples than the grid asks.\n")


def run_sections(bench: str, runs: list[dict], plots_dir: Path, link_dir: str, mode: str) -> str:
    if not runs:
        return (f"No results yet: `benchmarks/{bench}.py` has not been run in {mode} mode "
                f"(`python benchmarks/report.py --run {mode} --stages {bench}` runs it).\n")
    parts = []
    for run in runs:
        scenario = f": {run['scenario']}" if run.get("scenario") else ""
        parts += [f"### {run.get('device', '?')}{scenario}", "", tables.run_header(run), ""]
        parts += [x for x in RENDER[bench](run, plots_dir, link_dir) if x] + [""]
    return "\n".join(parts)


def _image(name, link_dir, alt):
    return f"![{alt}]({link_dir}/{name})\n" if name else ""


def quality_parts(run, plots_dir, link_dir):
    dropped = [f"{f['task']} at {f['context']:,}" for f in run.get("dense_filter", [])
               if not f["kept"]]
    return ["Perplexity (lower is better); each cell: value (×ratio to dense):\n",
            tables.quality_perplexity(run) + "\n",
            _image(report_plots.quality_plot(run, "perplexity", plots_dir), link_dir,
                   "perplexity against budget"),
            "Task scores (fraction of answer items found, higher is better):\n",
            tables.quality_tasks(run) + "\n",
            _image(report_plots.quality_plot(run, "task", plots_dir), link_dir,
                   "task score against budget"),
            f"Dense scored below the filter on {', '.join(dropped)}: other methods not run there"
            f" (\"stopped\": dense stopped once {tables.pct(_min_dense(run))} was out of reach).\n"
            if dropped else "",
            *_attended_parts(run), *(f"Note: {n}\n" for n in run.get("notes", []))]


def _min_dense(run) -> float:
    return (run.get("settings") or {}).get("min_dense", report_grid.MIN_DENSE)


def _attended_parts(run) -> list[str]:
    text = tables.quality_attended(run)
    if not text:
        return []
    return ["Tokens attended per query and KV head, mean (× the budget), from the backend's "
            "counters, over perplexity's scored positions and a task's answer steps: Radar "
            "spends its budget on whole segments of pages, so it attends up to a segment less; "
            "Recycled's full steps attend the whole context, so it attends more. Rows measured "
            "before these counts were recorded: —.\n",
            text + "\n"]


def speed_parts(run, plots_dir, link_dir):
    return ["Decode tokens/s (higher is better); each cell: value (×ratio to dense):\n",
            tables.speed_table(run, "decode_tok_s", 1) + "\n",
            _image(report_plots.speed_plot(run, plots_dir), link_dir, "decode speed against context"),
            "Time to first token, s (one prefill of the whole batch):\n",
            tables.speed_table(run, "ttft_s", 2) + "\n"]


def load_parts(run, plots_dir, link_dir):
    settings = run.get("settings", {})
    pool = (f"; every server's KV pool {settings['kv_blocks']} blocks"
            if settings.get("kv_blocks") else "")
    return [f"{settings.get('requests', '?')} requests, {settings.get('concurrency', '?')} "
            f"concurrent{pool}; each cell: value (×ratio to dense):\n",
            tables.load_table(run) + "\n",
            _image(report_plots.load_plot(run, plots_dir), link_dir,
                   "running requests and KV pool use under load"),
            "**Run failed** (errors, short outputs or server errors).\n" if run.get("ok") is False
            else ""]


def radar_perplexity_parts(run, plots_dir, link_dir):
    return [tables.radar_perplexity_table(run) + "\n"]


RENDER = {"quality": quality_parts, "speed": speed_parts, "load": load_parts,
          "radar_perplexity": radar_perplexity_parts}


def document(results: dict, plots_dir: Path, link_dir: str, notes_dir: Path | None,
             small: bool) -> str:
    """The whole markdown file; writes the plots into `plots_dir`, linked as `link_dir/...`."""
    def sections(bench):
        return run_sections(bench, results[bench], plots_dir, link_dir,
                            "small" if small else "full")

    def n(name):
        return note(notes_dir, name)

    mode = ("Small (CI) mode: the `*_small.json` results, tiny settings; hand-written notes "
            "omitted." if small else "")
    parts = [
        "<!-- Generated by `python benchmarks/report.py` from benchmarks/results/*.json and "
        "benchmarks/notes/*.md; edit those, not this file. -->", "# Benchmarks", n("intro"), mode,
        "## Targets", targets_section(results),
        "## Methods measured", coverage_section(results),
        "## Grid coverage", grid_section(results),
        "## Quality (`benchmarks/quality.py`)", n("quality"), sections("quality"),
        "## Radar perplexity (`benchmarks/radar_perplexity.py`)", n("radar_perplexity"),
        sections("radar_perplexity"), n("radar_estimator"),
        "## Decode speed (`benchmarks/speed.py`)", sections("speed"), n("cpu_speed"),
        "## Load (`benchmarks/load.py`)", sections("load"), n("load"),
        *(["## GPU kernels", n("gpu_kernels")] if n("gpu_kernels") else [])]
    text = "\n\n".join(p.strip("\n") for p in parts if p.strip())
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def render(results_dir: Path, out_md: Path, plots_dir: Path, notes_dir: Path | None,
           small: bool = False) -> Path:
    """Write `out_md` and its PNGs (stale PNGs in `plots_dir` removed first); returns out_md."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.png"):
        old.unlink()
    link_dir = os.path.relpath(plots_dir, out_md.parent)
    text = document(load_results(results_dir, small), plots_dir, link_dir, notes_dir, small)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    return out_md
