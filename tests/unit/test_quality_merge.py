# SPDX-License-Identifier: Apache-2.0
"""benchmarks/quality.py without an engine: merging a run into the stored run of its device
(rows of other methods kept, the stored dense row as the reference), the KV kept fraction
from the engine's attended-token counters, and how report.py renders NAtS's learned budget."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality  # noqa: E402
import report_render  # noqa: E402
import report_tables  # noqa: E402

SETTINGS = {"small": False, "methods": ["dense", "radar", "streaming"], "tasks": ["niah_single"],
            "task_contexts": [2048], "ppl_contexts": [2048, 4096], "windows": 2, "samples": 16,
            "fractions": [0.25], "format": "chat", "min_dense": 0.8, "seed": 0, "batch": 8,
            "dtype": None}


def row(kind, context, method, score, fraction=None, **extra):
    budget = None if method == "dense" else int(fraction * context) if fraction else "learned"
    r = {"kind": kind, "context": context, "method": method, "budget": budget,
         "fraction": fraction, "score": score, "seconds": 1.0, **extra}
    if kind == "perplexity":
        r.update(windows=2, score_from=context // 2)
    else:
        r.update(task="niah_single", samples=16)
    return r


def run(rows, settings=SETTINGS, **extra):
    return {"device": "cpu", "machine": "m", "date": "2026-11-23T15:05:06+00:00",
            "versions": {"vllm": "0.32.0"}, "model": "SmolLM2-135M-Instruct",
            "dtype": "float32", "mode": "full", "command": "python benchmarks/quality.py x",
            "settings": settings, "dense_backend": "CPU_ATTN", "notes": ["old note"],
            "dense_filter": [{"task": "niah_single", "context": 2048, "dense": 1.0,
                              "kept": True}], "rows": rows, **extra}


OLD = run([row("perplexity", 2048, "dense", 8.925), row("perplexity", 2048, "radar", 9.411, 0.25),
           row("perplexity", 4096, "dense", 8.07), row("perplexity", 4096, "radar", 8.4, 0.25),
           row("task", 2048, "dense", 1.0), row("task", 2048, "streaming", 0.125, 0.25)])


def nats_run(old=OLD):
    dense = quality.stored_dense(old)
    rows = [{**dense[("perplexity", None, 2048)], "stored": True},
            row("perplexity", 2048, "nats", 9.8, kv_kept=0.31),
            row("perplexity", 2048, "radar", 9.5, 0.25),            # a rerun of a stored cell
            row("task", 2048, "nats", 0.5, kv_kept=0.3)]
    settings = {**SETTINGS, "methods": ["nats", "radar"], "ppl_contexts": [2048]}
    return run(rows, settings, date="2026-11-23T20:30:00+00:00",
               command="python benchmarks/quality.py --methods nats --merge",
               notes=["dense not rerun"], dense_filter=[])


def test_merge_keeps_other_methods_and_replaces_the_same_cell():
    merged = quality.merge_runs(json.loads(json.dumps(OLD)), nats_run())
    cells = {quality.row_key(r): r for r in merged["rows"]}
    assert len(merged["rows"]) == 8              # 6 stored + 2 nats; radar 2K replaced
    assert cells[("perplexity", None, 2048, "radar", 0.25)]["score"] == 9.5
    assert cells[("perplexity", None, 4096, "radar", 0.25)]["score"] == 8.4
    assert cells[("task", "niah_single", 2048, "streaming", 0.25)]["score"] == 0.125
    assert not any(r.get("stored") for r in merged["rows"])
    # vs dense of every row, from the merged run's dense rows (the stored ones here)
    assert cells[("perplexity", None, 2048, "nats", None)]["vs_dense"] == pytest.approx(9.8 / 8.925)
    assert cells[("task", "niah_single", 2048, "nats", None)]["vs_dense"] == 0.5
    assert cells[("perplexity", None, 2048, "dense", None)]["score"] == 8.925
    # the stored run's own record stays; the merge is listed
    assert merged["command"] == OLD["command"] and merged["date"] == OLD["date"]
    (entry,) = merged["merged"]
    assert entry["methods"] == ["nats", "radar"] and entry["rows"] == 3
    assert entry["command"].endswith("--merge")
    assert merged["settings"]["methods"] == ["dense", "radar", "streaming", "nats"]
    assert merged["settings"]["ppl_contexts"] == [2048, 4096]
    assert merged["notes"] == ["old note", "dense not rerun"]
    assert merged["dense_filter"] == OLD["dense_filter"]
    # a second merge appends
    again = quality.merge_runs(merged, nats_run(merged))
    assert len(again["merged"]) == 2 and len(again["rows"]) == 8


def test_merge_into_nothing_is_the_run_itself():
    new = nats_run()
    assert quality.merge_runs(None, new) is new


@pytest.mark.parametrize("key,value", [("windows", 4), ("samples", 32), ("format", "plain"),
                                       ("seed", 1)])
def test_merge_refuses_other_cell_settings(key, value):
    """Format and seed define the run; windows and samples define a cell, so they must match
    in the cells the stored run has (perplexity 2K / 4K, niah_single 2K here)."""
    with pytest.raises(ValueError, match=f"cannot --merge.*{key}"):
        quality.check_mergeable(OLD, {**SETTINGS, key: value}, "float32", OLD["model"])
    with pytest.raises(ValueError, match="dtype"):
        quality.check_mergeable(OLD, SETTINGS, "bfloat16", OLD["model"])
    quality.check_mergeable(OLD, {**SETTINGS, "methods": ["nats"], "ppl_contexts": [1024]},
                            "float32", OLD["model"])


def test_merge_new_cells_may_have_their_own_windows_and_samples():
    """7.5K cells with 4 windows and 32 samples join a stored run of 2 windows / 16 samples; the
    report shows each cell's own count."""
    settings = {**SETTINGS, "ppl_contexts": [7680], "task_contexts": [7680], "windows": 4,
                "samples": 32}
    quality.check_mergeable(OLD, settings, "float32", OLD["model"])
    with pytest.raises(ValueError, match=r"samples 16 \(stored niah_single at 2048\) vs 32"):
        quality.check_mergeable(OLD, {**settings, "task_contexts": [2048, 7680]}, "float32",
                                OLD["model"])
    new_rows = [row("perplexity", 7680, "dense", 9.0), row("perplexity", 7680, "radar", 9.2, 0.25),
                row("task", 7680, "dense", 1.0), row("task", 7680, "radar", 0.75, 0.25)]
    for r in new_rows:
        r.update(windows=4) if r["kind"] == "perplexity" else r.update(samples=32)
    merged = quality.merge_runs(json.loads(json.dumps(OLD)), run(new_rows, settings))
    assert len(merged["rows"]) == 10
    ppl, tasks = report_tables.quality_perplexity(merged), report_tables.quality_tasks(merged)
    assert "| 2,048 | 2 |" in ppl and "| 7,680 | 4 |" in ppl
    assert "| niah_single | 2,048 | 16 |" in tasks and "| niah_single | 7,680 | 32 |" in tasks


def test_merge_with_save_run_keeps_other_devices(tmp_path):
    from results_io import read_runs, save_run

    path = tmp_path / "quality.json"
    gpu = {**OLD, "device": "NVIDIA H100"}
    path.write_text(json.dumps([gpu, OLD]))
    save_run(path, quality.merge_runs(quality.stored_run(path, "cpu"), nats_run()))
    runs = read_runs(path)
    assert [r["device"] for r in runs] == ["NVIDIA H100", "cpu"]
    assert runs[0] == gpu and len(runs[1]["rows"]) == 8


class FakeEngine:
    """Engine.counts() readings: (attended, context, queries) summed over layers and KV heads;
    each decode() is one step of `step` = (attended, context, queries)."""

    def __init__(self, step):
        self.counters, self.step = (0, 0, 0), step

    def counts(self):
        return None if self.step is None else self.counters

    def decode(self):
        self.counters = tuple(a + b for a, b in zip(self.counters, self.step))
        return {"score": 1.0}


def test_kv_kept_from_the_engine_counters():
    engine = FakeEngine((300, 1000, 3))
    engine.decode()                                   # an earlier cell: not counted
    res = quality.measure_kept(engine, "nats", lambda: [engine.decode(), engine.decode()][0])
    assert res["kv_kept"] == pytest.approx(0.3) and res["kv_kept_source"].startswith("engine")
    assert res["attended_mean"] == pytest.approx(100.0)     # 600 tokens over 6 queries
    assert quality.measure_kept(FakeEngine(None), "radar", lambda: {"score": 2.0}) == \
        {"score": 2.0, "kv_kept": 1.0, "kv_kept_source": "no eviction"}
    with pytest.raises(RuntimeError, match="no attended-token counts"):
        quality.measure_kept(FakeEngine(None), "nats", lambda: {"score": 1.0})
    assert quality.kv_kept((5, 10, 1), (5, 10, 1)) is None    # no decode step in between


def test_attended_recorded_for_non_evicting_sparse_methods_only():
    """Recycled keeps every KV token (kv_kept 1.0), but what it attended, full steps included,
    is recorded; dense (vLLM's backend) has no counters and records nothing."""
    engine = FakeEngine((2000, 4000, 2))
    res = quality.measure_kept(engine, "recycled", engine.decode)
    assert res["kv_kept"] == 1.0
    assert res["attended_mean"] == pytest.approx(1000.0)
    assert res["attended_share"] == pytest.approx(0.5)
    assert "attended_mean" not in quality.measure_kept(engine, "dense", engine.decode)
    idle = quality.measure_kept(engine, "radar", lambda: {"score": 1.0})   # no query counted
    assert "attended_mean" not in idle


def test_report_shows_attended_tokens_beside_the_budget():
    rows = [
        {"kind": "perplexity", "context": 1024, "method": "radar", "budget": 128,
         "fraction": 0.125, "score": 12.0, "attended_mean": 90.9},
        {"kind": "perplexity", "context": 1024, "method": "recycled", "budget": 128,
         "fraction": 0.125, "score": 10.6, "attended_mean": 203.3},
        {"kind": "perplexity", "context": 1024, "method": "streaming", "budget": 128,
         "fraction": 0.125, "score": 12.5},             # stored before the counts: a dash
    ]
    text = report_tables.quality_attended({"rows": rows})
    line = next(x for x in text.splitlines() if x.startswith("| perplexity | 1,024"))
    assert line == "| perplexity | 1,024 | 12.5% (128) | 91 (×0.71) | 203 (×1.59) | — |"
    assert report_tables.quality_attended({"rows": rows[2:]}) == ""


def test_nats_config_has_no_budget_and_no_evaluation_mode():
    assert quality.sparse_config("nats", None, None) == ("nats", {})
    backend, config = quality.sparse_config("streaming", 512, 1024)
    assert backend == "radar" and config["eval_sparse_prefill_from"] == 1024
    assert "nats" in quality.METHODS
    assert quality.budget_text(row("perplexity", 2048, "nats", 9.8)) == "learned"


def test_report_renders_nats_learned_budget_with_kv_kept(tmp_path):
    merged = quality.merge_runs(json.loads(json.dumps(OLD)), nats_run())
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality.json").write_text(json.dumps([merged]))
    md = report_render.render(results, tmp_path / "B.md", tmp_path / "plots", None).read_text()
    lines = [[c.strip() for c in x.strip("|").split("|")] for x in md.splitlines()
             if x.startswith("| 2,048 |")]
    header = next(x for x in md.splitlines() if x.startswith("| context | windows"))
    assert [c.strip() for c in header.strip("|").split("|")] == \
        ["context", "windows", "budget (tokens)", "dense", "radar", "nats"]
    assert lines[0] == ["2,048", "2", "25% (512)", "8.925", "9.500 (×1.064)", "—"]
    assert lines[1] == ["2,048", "2", "learned; KV kept: nats 31.0%", "8.925", "—",
                        f"9.800 (×{9.8 / 8.925:.3f})"]
    task_line = next(x for x in md.splitlines()
                     if x.startswith("| niah_single | 2,048 | 16 | learned"))
    assert "learned; KV kept: nats 30.0%" in task_line and "0.500 (×0.500)" in task_line
    assert "Merged into this run (nats, radar; 3 rows" in md
    assert (tmp_path / "plots" / "quality_perplexity_cpu.png").exists()
    # the targets ignore NAtS's rows (no budget fraction); coverage lists it
    assert report_tables.budget_key(row("task", 2048, "nats", 0.5)) == "learned"
    assert "| nats | cpu |" in md


def test_replace_cells_measures_a_stored_cell_anew_and_drops_its_old_rows():
    """niah_single at 2K stored with 16 samples is rerun by dense with 32 and --replace-cells:
    every stored row of that cell (dense's and StreamingLLM's) is dropped, the other cells
    stay; without dense among the methods the resize is still refused."""
    settings = {**SETTINGS, "methods": ["dense"], "ppl_contexts": [], "samples": 32,
                "replace_cells": True}
    with pytest.raises(ValueError, match="samples 16"):
        quality.check_mergeable(OLD, {**settings, "methods": ["radar"]}, "float32", OLD["model"])
    quality.check_mergeable(OLD, settings, "float32", OLD["model"])
    assert quality.resized_cells(OLD, settings) == {("task", "niah_single", 2048)}
    dense32 = row("task", 2048, "dense", 0.969)
    dense32["samples"] = 32
    merged = quality.merge_runs(json.loads(json.dumps(OLD)), run([dense32], settings))
    tasks = [r for r in merged["rows"] if r["kind"] == "task"]
    assert [(r["method"], r["samples"], r["score"]) for r in tasks] == [("dense", 32, 0.969)]
    assert len([r for r in merged["rows"] if r["kind"] == "perplexity"]) == 4
    assert "replace_cells" not in merged["settings"]


def test_replace_cells_flag_needs_merge_and_dense(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quality.py", "--merge", "--replace-cells",
                                      "--methods", "radar"])
    with pytest.raises(SystemExit):
        quality.parse_args()
    assert "--replace-cells needs --merge and dense" in capsys.readouterr().err
