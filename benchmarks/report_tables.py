# SPDX-License-Identifier: Apache-2.0
"""Markdown tables of one run of each benchmark (quality, speed, load, radar_perplexity).

Every ratio to dense is computed here from the same run's dense row, never read from the file.
A cell that was not measured is an em dash. A method with a learned budget (NAtS: its gates
decide what is kept; quality.py stores `budget: "learned"`) gets its own line per cell, its
budget shown as the measured share of KV kept (`kv_kept`).
"""

import json

DASH = "—"
METHOD_ORDER = ("dense", "radar", "recycled", "streaming", "nats", "sparsek")
LEARNED = "learned"


def num(x, digits=3) -> str:
    if x is None:
        return DASH
    return f"{x:,}" if isinstance(x, int) else f"{x:,.{digits}f}"


def cell(value, ref, digits=3) -> str:
    """`value (×value/ref)`, or the value alone without a reference (ref None: dense's own cell)."""
    if value is None:
        return DASH
    if not ref:
        return num(value, digits)
    return f"{num(value, digits)} (×{value / ref:.3f})"


def pct(fraction) -> str:
    return f"{fraction * 100:g}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def methods_of(rows, key="method") -> list[str]:
    seen = {r[key] for r in rows}
    return sorted(seen, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


def run_header(run: dict) -> str:
    """Device, machine, versions, date and the command of a run, as a bullet list."""
    versions = run.get("versions") or {k: run[k] for k in ("vllm", "torch") if k in run}
    versions = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    command = run.get("command")
    if command:
        command = f"`{command}`"
    elif "score_from" in run and "radar" in run:   # radar_perplexity.py records every flag
        command = (f"`python benchmarks/radar_perplexity.py --context {run['context']} --windows "
                   f"{run['windows']} --budget {run['budget']} --score-from {run['score_from']}`")
    else:
        settings = {k: v for k, v in (run.get("settings") or {}).items()
                    if v not in (None, [], False)}
        command = f"not recorded (settings: `{json.dumps(settings, separators=(',', ':'))}`)"
    model = run.get("model", "")
    lines = [f"- Device: **{run.get('device', '?')}**; machine: {run.get('machine', '?')}",
             f"- Versions: {versions or '?'}; date: {run.get('date', '?')}"
             + (f"; model: {model.rsplit('/', 1)[-1]}" if model else ""),
             f"- Command: {command}"]
    for m in run.get("merged", []):
        methods = ", ".join(m.get("methods", [])) or "?"
        rows = m.get("rows", "?")
        code = (m.get("versions") or {}).get("vllm_sparse")
        lines.append(f"- Merged into this run ({methods}; {rows} row{'' if rows == 1 else 's'}; "
                     f"date: {m.get('date', '?')}" + (f"; code: {code}" if code else "")
                     + f"): `{m.get('command', '?')}`")
    return "\n".join(lines)


def budget_key(row):
    """None for dense, "learned" for a learned budget, else the budget fraction."""
    if row["method"] == "dense":
        return None
    return LEARNED if row.get("budget") == LEARNED else row["fraction"]


def _budget_lines(rows, context) -> list[tuple]:
    """(key, budget text) of each line at one context: the budget fractions, then a learned
    line if a method has one (its text: the measured KV kept share, per learned method);
    dense alone: one line without a budget."""
    here = [r for r in rows if r["context"] == context]
    lines = [(f, f"{pct(f)} ({b:,})") for f, b in sorted(
        {(r["fraction"], r["budget"]) for r in here
         if r["fraction"] is not None and r.get("budget") != LEARNED})]
    learned = [r for r in here if r["method"] != "dense" and r.get("budget") == LEARNED]
    if learned:
        kept = {}
        for r in learned:
            if r.get("kv_kept") is not None:
                kept.setdefault(r["method"], []).append(r["kv_kept"])
        text = ", ".join(f"{m} {100 * sum(v) / len(v):.1f}%" for m, v in kept.items())
        lines.append((LEARNED, f"learned; KV kept: {text}" if text else LEARNED))
    return lines or [(None, DASH)]


def cell_samples(row) -> int | None:
    """The samples a task row's cell was run for: a dense row that quality.py stopped early
    (the task filter's bar out of reach, `planned_samples` recorded) counts as planned."""
    return row.get("planned_samples", row.get("samples"))


def _sizes(rows, key: str) -> str:
    """The windows / samples a cell's scores average over ("?" if not recorded)."""
    values = sorted({cell_samples(r) if key == "samples" else r.get(key) for r in rows},
                    key=lambda v: (v is None, v or 0))
    return "/".join("?" if v is None else str(v) for v in values) or "?"


def quality_perplexity(run: dict) -> str:
    rows = [r for r in run.get("rows", []) if r["kind"] == "perplexity"]
    if not rows:
        return ""
    methods = methods_of(rows)
    at = {(r["method"], r["context"], budget_key(r)): r["score"] for r in rows}
    out = []
    for context in sorted({r["context"] for r in rows}):
        ref = at.get(("dense", context, None))
        size = _sizes([r for r in rows if r["context"] == context], "windows")
        for key, budget_text in _budget_lines(rows, context):
            line = [f"{context:,}", size, budget_text]
            for m in methods:
                dense = m == "dense"
                line.append(cell(at.get((m, context, None if dense else key)),
                                 None if dense else ref))
            out.append(line)
    return table(["context", "windows", "budget (tokens)", *methods], out)


def quality_tasks(run: dict) -> str:
    rows = [r for r in run.get("rows", []) if r["kind"] == "task"]
    if not rows:
        return ""
    methods = methods_of(rows)
    at = {(r["method"], r["task"], r["context"], budget_key(r)): r for r in rows}
    out = []
    cells = sorted({(r["task"], r["context"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for task, context in cells:
        dense_row = at.get(("dense", task, context, None))
        ref = dense_row["score"] if dense_row else None
        here = [r for r in rows if r["task"] == task]
        size = _sizes([r for r in here if r["context"] == context], "samples")
        for key, budget_text in _budget_lines(here, context):
            line = [task, f"{context:,}", size, budget_text]
            for m in methods:
                if m == "dense":
                    line.append(_dense_task_cell(dense_row))
                    continue
                r = at.get((m, task, context, key))
                line.append(cell(r and r["score"], ref))
            out.append(line)
    return table(["task", "context", "samples", "budget (tokens)", *methods], out)


def quality_attended(run: dict) -> str:
    """Mean KV tokens attended per (query, KV head) by each sparse method (`attended_mean`, from
    the backend's counters: perplexity's scored positions, a task's answer steps), beside the
    budget: "91 (×0.71)" is 91 tokens, 0.71 of the budget. Rows stored before quality.py
    recorded it show an em dash; a table without any count is left out."""
    rows = [r for r in run.get("rows", []) if r["method"] != "dense"]
    if not any(r.get("attended_mean") is not None for r in rows):
        return ""
    methods = methods_of(rows)
    at = {(r["method"], r.get("task"), r["context"], budget_key(r)): r for r in rows}
    cells = sorted({(r.get("task"), r["context"]) for r in rows},
                   key=lambda k: (k[0] is not None, k[0] or "", k[1]))
    out = []
    for task, context in cells:
        here = [r for r in rows if r.get("task") == task]
        for key, budget_text in _budget_lines(here, context):
            line = [task or "perplexity", f"{context:,}", budget_text]
            for m in methods:
                r = at.get((m, task, context, key))
                mean = r and r.get("attended_mean")
                budget = r and r.get("budget")
                line.append(DASH if mean is None else f"{mean:,.0f}" + (
                    f" (×{mean / budget:.2f})" if isinstance(budget, int) and budget else ""))
            out.append(line)
    return table(["kind", "context", "budget (tokens)", *methods], out)


def _dense_task_cell(row) -> str:
    """Dense's score; a row stopped early by the task filter says after how many samples."""
    if row is None:
        return DASH
    if row.get("planned_samples"):
        return f"{num(row['score'])} ({row['samples']} of {row['planned_samples']}, stopped)"
    return num(row["score"])


def speed_table(run: dict, key: str, digits: int) -> str:
    rows = run.get("rows", [])
    if not rows:
        return ""
    methods = methods_of(rows)
    at = {(r["method"], r["context"], r["batch"]): r[key] for r in rows}
    out = []
    for context, batch in sorted({(r["context"], r["batch"]) for r in rows}):
        budgets = {r["budget"] for r in rows if r["context"] == context and r["budget"]}
        ref = at.get(("dense", context, batch))
        out.append([f"{context:,}", batch, ", ".join(f"{b:,}" for b in sorted(budgets)) or DASH,
                    *(cell(at.get((m, context, batch)), None if m == "dense" else ref, digits)
                      for m in methods)])
    return table(["context", "batch", "budget (tokens)", *methods], out)


LOAD_ROWS = [("latency p50 (s)", "latency_p50_s"), ("latency p90 (s)", "latency_p90_s"),
             ("latency p99 (s)", "latency_p99_s"), ("TTFT p50 (s)", "ttft_p50_s"),
             ("TTFT p90 (s)", "ttft_p90_s"), ("TTFT p99 (s)", "ttft_p99_s"),
             ("requests/s", "requests_per_s"), ("output tokens/s", "output_tokens_per_s"),
             ("errors", "errors"), ("preemptions", "preemptions"),
             ("running requests, mean", "running_mean"), ("running requests, peak", "running_peak"),
             ("waiting requests, mean", "waiting_mean"), ("KV pool use, mean", "kv_usage_mean"),
             ("KV held per running request (tokens)", "kv_tokens_per_running")]
LOAD_NO_RATIO = ("errors", "preemptions", "running_peak")   # counts and peaks: no × dense
LOAD_GAUGES = ("running_mean", "running_peak", "waiting_mean", "kv_usage_mean",
               "kv_tokens_per_running")
"""load.py's samples of the server's gauges; runs before 2026-11-24 have none (rows left out)."""


def load_table(run: dict) -> str:
    backends = methods_of([{"method": b} for b in run.get("runs", {})])
    if not backends:
        return ""
    sampled = any(key in r for r in run["runs"].values() for key in LOAD_GAUGES)
    out = []
    for label, key in LOAD_ROWS:
        if key in LOAD_GAUGES and not sampled:
            continue
        ref = run["runs"].get("dense", {}).get(key)
        ratio_ok = key not in LOAD_NO_RATIO
        out.append([label, *(cell(run["runs"][b].get(key),
                                  ref if ratio_ok and b != "dense" else None) for b in backends)])
    return table(["", *backends], out)


def radar_perplexity_table(run: dict) -> str:
    dense, radar = run["dense"]["ppl"], run["radar"]["ppl"]
    budget = f"{pct(float(run['budget']))} of each position's context"
    return table(["method", "budget", "perplexity", "vs dense"],
                 [["dense (vLLM's own backend)", "all", num(dense), num(1.0)],
                  ["Radar", budget, num(radar), num(radar / dense)]])
