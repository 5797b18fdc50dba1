# SPDX-License-Identifier: Apache-2.0
"""benchmarks/report_grid.py: which cells of the issue's grid each method has, from synthetic
runs (measured, missing, few samples, partial, n/a, learned budgets, speed without dense)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import report_grid as grid  # noqa: E402
from report_grid import FRACTIONS, TASKS  # noqa: E402


def ppl(context, method, fraction=None, budget=None):
    if budget is None and fraction is not None:
        budget = int(fraction * context)
    return {"kind": "perplexity", "context": context, "method": method, "fraction": fraction,
            "budget": budget, "score": 9.0}


def task(name, context, method, score, fraction=None, samples=32, budget=None):
    return {**ppl(context, method, fraction, budget), "kind": "task", "task": name,
            "score": score, "samples": samples}


def quality_run(rows):
    return {"device": "cpu", "settings": {"min_dense": 0.8}, "rows": rows}


def test_perplexity_cells_per_budget_and_learned():
    rows = [ppl(c, "dense") for c in (2048, 4096)]
    rows += [ppl(2048, "radar", f) for f in FRACTIONS] + [ppl(4096, "radar", 0.25)]
    rows += [ppl(2048, "nats", budget="learned")]
    run = quality_run(rows)
    assert grid.summary(grid.perplexity_cells(run, "dense")) == "2 of 4; missing 1,024, 7,680"
    assert grid.summary(grid.perplexity_cells(run, "radar")) == (
        "4 of 12; missing 1,024 (all), 4,096 (12.5%, 50%), 7,680 (all)")
    assert grid.summary(grid.perplexity_cells(run, "nats")) == (
        "1 of 4; missing 1,024, 4,096, 7,680")
    assert grid.summary(grid.perplexity_cells(run, "sparsek")) == (
        "0 of 12; missing 1,024 (all), 2,048 (all), 4,096 (all), 7,680 (all)")


def test_task_cells_follow_the_dense_filter_and_samples():
    dense_2k = [task(t, 2048, "dense", 1.0 if t == "niah_single" else 0.3) for t in TASKS]
    dense_4k = [task(t, 4096, "dense", 0.2, samples=16) for t in TASKS]       # kept none
    dense_7k = [task("niah_single", 7680, "dense", 0.9)]                      # one task only
    radar = [task("niah_single", 2048, "radar", 1.0, f) for f in (0.125, 0.25)]
    radar += [task("niah_single", 2048, "radar", 1.0, 0.5, samples=16)]
    radar += [task("niah_single", 7680, "radar", 1.0, 0.25)]
    run = quality_run(dense_2k + dense_4k + dense_7k + radar)
    cells = grid.task_cells(run, "radar")
    assert cells[(2048, 0.125)] == cells[(2048, 0.25)] == "measured"
    assert cells[(2048, 0.5)] == "few samples"
    assert cells[(4096, 0.25)] == "n/a"             # dense kept no task at 4K: nothing to run
    assert cells[(7680, 0.25)] == "partial"         # dense ran 1 of 5 tasks there
    assert cells[(7680, 0.5)] == "missing"
    assert grid.summary(cells) == (
        "5 of 9; missing 7,680 (12.5%, 50%); partial 7,680 (25%); few samples 2,048 (50%)")
    # dense: 2K has all five tasks at 32 samples; 4K too few samples; 7.5K one task
    assert grid.summary(grid.task_cells(run, "dense")) == (
        "1 of 3; partial 7,680; few samples 4,096")


def test_speed_cells_need_dense_beside_them():
    def row(c, b, m):
        return {"context": c, "batch": b, "method": m, "decode_tok_s": 1.0}
    run = {"device": "cpu", "rows": [row(2048, 1, "dense"), row(2048, 1, "radar"),
                                     row(4096, 8, "radar")]}       # 4K: no dense beside it
    assert grid.summary(grid.speed_cells(run, "radar")) == (
        "1 of 6; missing 2,048 (batch 8), 4,096 (all), 7,680 (all)")


def test_grid_rows_list_every_method_per_device():
    quality = quality_run([ppl(1024, "dense")])
    speed = {"device": "gpu", "rows": [{"context": 2048, "batch": 1, "method": "dense"}]}
    rows = grid.grid_rows({"quality": [quality], "speed": [speed]}, ("dense", "radar"))
    assert [r[:2] for r in rows] == [["cpu", "dense"], ["cpu", "radar"],
                                     ["gpu", "dense"], ["gpu", "radar"]]
    assert rows[0][2].startswith("1 of 4") and rows[0][4] == "—"   # no cpu speed run
    assert rows[2][2] == "—" and rows[2][4].startswith("1 of 6")
