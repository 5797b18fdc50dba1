# SPDX-License-Identifier: Apache-2.0
"""benchmarks/fill_grid.py plans only the grid cells a device lacks: dense before the sparse
methods of a context, the dense row's windows reused, sparse task jobs only for the tasks dense
kept, one speed job per missing (context, batch) cell, cheapest first."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fill_grid  # noqa: E402
from report_grid import FRACTIONS, PPL_CONTEXTS, TASK_CONTEXTS, TASKS  # noqa: E402


def ppl(context, method, fraction=None, windows=3, budget=None):
    if budget is None and fraction is not None:
        budget = int(fraction * context)
    return {"kind": "perplexity", "context": context, "method": method, "fraction": fraction,
            "budget": budget, "score": 9.0, "windows": windows}


def task(name, context, method, score, fraction=None, samples=32):
    return {**ppl(context, method, fraction), "kind": "task", "task": name, "score": score,
            "samples": samples}


def argv_value(job, flag):
    return job.argv[job.argv.index(flag) + 1]


def test_empty_results_plan_dense_first_everywhere():
    jobs = fill_grid.plan({"quality": [], "speed": []}, "cpu")
    quality = [j for j in jobs if j.bench == "quality"]
    assert all(argv_value(j, "--methods") == "dense" for j in quality)
    assert all("--replace-cells" in j.argv for j in quality)    # stored 16 samples -> 32
    assert len(quality) == len(PPL_CONTEXTS) + len(TASK_CONTEXTS)
    assert len([j for j in jobs if j.bench == "speed"]) == 6
    assert [j.estimate_s for j in jobs] == sorted(j.estimate_s for j in jobs)
    assert all("--merge" in j.argv for j in jobs)


def test_sparse_jobs_reuse_dense_windows_and_ask_only_missing_budgets():
    rows = [ppl(c, "dense") for c in PPL_CONTEXTS]
    rows += [ppl(2048, "radar", f) for f in FRACTIONS if f != 0.5]
    rows += [ppl(c, "nats", budget="learned") for c in PPL_CONTEXTS]
    run = {"device": "cpu", "rows": rows}
    jobs = fill_grid.quality_jobs(run)
    radar_2k = [j for j in jobs if j.cells.startswith("perplexity 2,048: radar")]
    assert len(radar_2k) == 1
    assert argv_value(radar_2k[0], "--fractions") == "0.5"
    assert argv_value(radar_2k[0], "--windows") == "3"            # the stored dense row's
    assert "--replace-cells" not in radar_2k[0].argv
    assert not [j for j in jobs if "nats" in j.cells and "perplexity" in j.cells]
    assert not [j for j in jobs if "perplexity" in j.cells and "dense" in j.cells]


def test_task_jobs_wait_for_dense_and_run_only_kept_tasks():
    dense = [task(t, 2048, "dense", 0.9 if t in ("niah_single", "niah_multikey") else 0.1)
             for t in TASKS]
    dense += [task(t, 4096, "dense", 0.1) for t in TASKS]                   # keeps none
    dense += [task(t, 7680, "dense", 1.0, samples=16) for t in TASKS]       # too few samples
    radar = [task("niah_single", 2048, "radar", 1.0, f) for f in FRACTIONS]
    radar += [task("niah_multikey", 2048, "radar", 1.0, f) for f in FRACTIONS]
    run = {"device": "cpu", "settings": {"min_dense": 0.8}, "rows": dense + radar}
    jobs = {j.cells.split(" (")[0]: j for j in fill_grid.quality_jobs(run)
            if j.cells.startswith("tasks")}
    assert "tasks 2,048: radar" not in " ".join(jobs)                     # all measured
    streaming = jobs["tasks 2,048: streaming 12.5%, 25%, 50%"]
    assert argv_value(streaming, "--tasks") == "niah_single,niah_multikey"
    assert argv_value(streaming, "--samples") == "32"
    assert not [k for k in jobs if k.startswith("tasks 4,096")]           # nothing to run
    assert [k for k in jobs if k.startswith("tasks 7,680")] == ["tasks 7,680: dense, all 5 tasks"]


def test_dense_task_job_runs_only_the_tasks_dense_lacks():
    dense = [task("niah_single", 7680, "dense", 0.97)]                       # full, kept
    dense += [task("niah_multikey", 7680, "dense", 0.1, samples=16)]        # too few samples
    stopped = task("niah_multivalue", 7680, "dense", 0.1, samples=9)
    dense += [{**stopped, "planned_samples": 32}]                           # stopped early: full
    radar = [task("niah_single", 7680, "radar", 0.97, 0.25)]
    run = {"device": "cpu", "settings": {"min_dense": 0.8}, "rows": dense + radar}
    jobs = [j for j in fill_grid.quality_jobs(run) if j.cells.startswith("tasks 7,680")]
    assert [j.cells for j in jobs] == [
        "tasks 7,680: dense, niah_multikey, variable_tracking, common_words"]
    assert argv_value(jobs[0], "--tasks") == "niah_multikey,variable_tracking,common_words"
    assert jobs[0].estimate_s == pytest.approx(
        fill_grid.ENGINE_START_S + 3 * 32 * fill_grid.prompt_s(7680))


def test_speed_jobs_cover_each_missing_cell_once():
    def row(c, b, m):
        return {"context": c, "batch": b, "method": m, "decode_tok_s": 1.0}
    methods = ("dense", *fill_grid.METHODS)
    rows = [row(c, b, m) for c in (2048, 4096) for b in (1, 8) for m in methods]
    rows = [r for r in rows if not (r["context"] == 4096 and r["batch"] == 8
                                    and r["method"] == "nats")]
    jobs = fill_grid.speed_jobs({"device": "cpu", "rows": rows})
    cells = [(argv_value(j, "--contexts"), argv_value(j, "--batches")) for j in jobs]
    assert cells == [("4096", "8"), ("7680", "1"), ("7680", "8")]


def test_bad_flags_name_the_value(monkeypatch, capsys):
    for argv, said in ((["--only", "load"], "--only 'load': allowed quality, speed"),
                       (["--hours", "0"], "--hours 0.0: must be > 0")):
        monkeypatch.setattr(sys, "argv", ["fill_grid.py", *argv])
        with pytest.raises(SystemExit) as exc:
            fill_grid.main()
        assert exc.value.code == 2 and said in capsys.readouterr().err
