# SPDX-License-Identifier: Apache-2.0
"""The issue's targets, each classified hit / missed / not measured from the results.

A target names one cell (context, and budget fraction or batch). A device whose results have
that cell gets hit or missed; one without it gets "not measured", with what the nearest
measured cell gives (and whether that value would pass), so a missing cell never reads as a
pass or a failure.
"""

import math
from dataclasses import dataclass
from typing import Callable

CONTEXT = 7680          # "7.5K"
FRACTION = 0.25         # budget, a fraction of the context
BATCH = 8
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue")
VISIBLY_WORSE = 0.90    # StreamingLLM's needle accuracy at most this fraction of dense's

Cells = dict[tuple, tuple[float, str]]   # cell -> (ratio to dense, source)


@dataclass
class Target:
    name: str
    bench: str                              # results file the cells come from
    want: str                               # the pass condition, as printed
    passes: Callable[[float], bool]
    cells: Callable[[dict], Cells]          # one run -> its measured cells
    cell: tuple = (CONTEXT, FRACTION)
    cpu_only: bool = False


def _key(*values) -> tuple:
    return tuple(round(v, 4) if isinstance(v, float) else v for v in values)


def perplexity_cells(method: str) -> Callable[[dict], Cells]:
    """(context, fraction) -> perplexity / dense perplexity, from a quality.py run."""
    def cells(run):
        rows = run.get("rows", [])
        dense = {r["context"]: r["score"] for r in rows
                 if r["kind"] == "perplexity" and r["method"] == "dense"}
        return {_key(r["context"], r["fraction"]): (r["score"] / dense[r["context"]], "quality.py")
                for r in rows if r["kind"] == "perplexity" and r["method"] == method
                and r["context"] in dense}
    return cells


def radar_perplexity_cells(run: dict) -> Cells:
    """The same ratio from a radar_perplexity.py run (fraction of each position's own context)."""
    return {_key(run["context"], float(run["budget"])):
            (run["radar"]["ppl"] / run["dense"]["ppl"], "radar_perplexity.py")}


def needle_cells(method: str) -> Callable[[dict], Cells]:
    """(context, fraction) -> mean needle-task score / dense's mean over the same tasks."""
    def cells(run):
        rows = [r for r in run.get("rows", []) if r["kind"] == "task" and r["task"] in NEEDLE_TASKS]
        dense = {(r["task"], r["context"]): r["score"] for r in rows if r["method"] == "dense"}
        groups: dict[tuple, list] = {}
        for r in rows:
            if r["method"] == method and (r["task"], r["context"]) in dense:
                groups.setdefault(_key(r["context"], r["fraction"]), []).append(r)
        out = {}
        for cell, group in groups.items():
            ref = sum(dense[(r["task"], r["context"])] for r in group)
            if ref > 0:
                out[cell] = (sum(r["score"] for r in group) / ref, "quality.py")
        return out
    return cells


def decode_cells(method: str) -> Callable[[dict], Cells]:
    """(context, batch) -> decode tokens/s / dense's, from a speed.py run."""
    def cells(run):
        rows = run.get("rows", [])
        dense = {(r["context"], r["batch"]): r["decode_tok_s"]
                 for r in rows if r["method"] == "dense"}
        return {(r["context"], r["batch"]): (r["decode_tok_s"] / dense[(r["context"], r["batch"])],
                                              "speed.py")
                for r in rows if r["method"] == method and (r["context"], r["batch"]) in dense}
    return cells


TARGETS = [
    Target("Radar perplexity within 3% of dense", "quality", "≤ 1.03 × dense",
           lambda x: x <= 1.03, perplexity_cells("radar")),
    Target("Radar needle accuracy at least 95% of dense", "quality", "≥ 0.95 × dense",
           lambda x: x >= 0.95, needle_cells("radar")),
    Target("StreamingLLM visibly worse on needle tasks", "quality",
           f"≤ {VISIBLY_WORSE:.2f} × dense", lambda x: x <= VISIBLY_WORSE,
           needle_cells("streaming")),
    Target("Radar decode tokens/s at least 1.3x dense (CPU engine)", "speed", "≥ 1.3 × dense",
           lambda x: x >= 1.3, decode_cells("radar"), cell=(CONTEXT, BATCH), cpu_only=True),
]
EXTRA_CELLS = {("Radar perplexity within 3% of dense", "radar_perplexity"): radar_perplexity_cells}


def device_cells(target: Target, results: dict[str, list[dict]]) -> dict[str, Cells]:
    """device -> every cell measured for the target on it."""
    sources = [(target.bench, target.cells)]
    sources += [(bench, fn) for (name, bench), fn in EXTRA_CELLS.items() if name == target.name]
    out: dict[str, Cells] = {}
    for bench, fn in sources:
        for run in results.get(bench, []):
            device = run.get("device", "?")
            if target.cpu_only and device != "cpu":
                continue
            for cell, value in fn(run).items():
                out.setdefault(device, {}).setdefault(cell, value)  # first source wins
    return out


def nearest(cells: Cells, cell: tuple) -> tuple:
    """The measured cell closest to `cell`: context first (log scale), then budget or batch."""
    def distance(c):
        return (abs(math.log2(c[0] / cell[0])), abs(math.log2(c[1] / cell[1])))
    return min(cells, key=distance)


def classify(target: Target, results: dict[str, list[dict]]) -> list[dict]:
    """One row per device: status hit / missed / not measured, value, nearest measured cell."""
    per_device = device_cells(target, results)
    if not per_device:
        return [{"target": target, "device": None, "status": "not measured", "value": None,
                 "nearest": None}]
    rows = []
    for device, cells in per_device.items():
        row = {"target": target, "device": device, "value": None, "nearest": None}
        if target.cell in cells:
            row["value"] = cells[target.cell]
            row["status"] = "hit" if target.passes(row["value"][0]) else "missed"
        else:
            near = nearest(cells, target.cell)
            row["status"], row["nearest"] = "not measured", (near, *cells[near])
        rows.append(row)
    return rows


def classify_all(results: dict[str, list[dict]]) -> list[dict]:
    return [row for target in TARGETS for row in classify(target, results)]
