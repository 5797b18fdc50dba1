# SPDX-License-Identifier: Apache-2.0
"""Dense's task filter stops a cell once --min-dense is out of reach (quality.run_tasks), and
a row stopped that way counts as its planned size in merges, the grid and the report."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality  # noqa: E402
import report_grid  # noqa: E402
import report_tables  # noqa: E402
from tasks import Sample  # noqa: E402


class ScriptedEngine:
    """Answers sample i correctly when right[i]; counts the prompts it was given."""

    def __init__(self, right: list[bool]):
        self.right, self.prompts = right, 0

    def generate(self, prompts, params):
        outs = []
        for ids in prompts:
            text = str(ids[0]) if self.right[ids[0]] else "no idea"
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
        self.prompts += len(prompts)
        return outs


class Bar:
    n = 0

    def update(self, k):
        self.n += k


def samples(n):
    return [Sample("niah_single", 2048, i, [i], (str(i),), 8) for i in range(n)]


@pytest.mark.parametrize("scores,left,bar,expected", [
    ([0.0] * 7, 25, 0.8, True),            # 25 / 32 = 0.781 < 0.8
    ([0.0] * 6, 26, 0.8, False),           # 26 / 32 = 0.8125: still reachable
    ([1.0, 0.5, 0.5], 29, 0.8, False),     # 31 / 32
    ([0.5] * 13, 19, 0.8, True),           # (6.5 + 19) / 32 = 0.797
    ([1.0] * 8, 24, 0.8, False),
])
def test_filter_out_of_reach(scores, left, bar, expected):
    assert quality.filter_out_of_reach(scores, left, bar) is expected


def test_filter_rejects_scores_outside_unit_interval():
    with pytest.raises(ValueError, match="lie in"):
        quality.filter_out_of_reach([1.5], 3, 0.8)


def test_dense_stops_once_the_filter_is_out_of_reach():
    right = [i % 3 == 0 for i in range(32)]           # 11 of 32 right: 0.344 if all ran
    engine, bar = ScriptedEngine(right), Bar()
    res = quality.run_tasks(engine, samples(32), batch=8, bar=bar, stop_below=0.8)
    # chunks of 1, 8, 8, ...: after 1 + 8 = 9 samples, 3 right: (3 + 23) / 32 = 0.81 goes on;
    # after 17, 6 right: (6 + 15) / 32 = 0.66 stops
    assert engine.prompts == 17 and res["samples"] == 17 and res["planned_samples"] == 32
    assert res["score"] == pytest.approx(6 / 17)
    assert "17 of 32" in res["stopped_early"] and bar.n == 32
    full = quality.run_tasks(ScriptedEngine(right), samples(32), 8, Bar())
    assert full["samples"] == 32 and "planned_samples" not in full
    assert full["score"] == pytest.approx(11 / 32)


def test_a_cell_dense_passes_runs_every_sample():
    right = [i != 5 for i in range(32)]               # 31 of 32
    engine = ScriptedEngine(right)
    res = quality.run_tasks(engine, samples(32), 8, Bar(), stop_below=0.8)
    assert engine.prompts == 32 and res["samples"] == 32 and "stopped_early" not in res


STOPPED = {"kind": "task", "task": "common_words", "context": 2048, "method": "dense",
           "budget": None, "fraction": None, "score": 0.05, "samples": 9,
           "planned_samples": 32}


def test_a_stopped_row_counts_as_its_planned_samples():
    assert report_tables.cell_samples(STOPPED) == 32
    assert quality.cell_size(STOPPED) == ("samples", 32)
    settings = {"samples": 32, "tasks": ["common_words"], "task_contexts": [2048]}
    assert quality.resized_cells({"rows": [STOPPED]}, settings) == set()
    assert quality.resized_cells({"rows": [STOPPED]}, {**settings, "samples": 64}) == \
        {("task", "common_words", 2048)}


def test_grid_and_report_show_a_stopped_dense_cell():
    kept = {**STOPPED, "task": "niah_single", "score": 1.0, "samples": 32}
    kept.pop("planned_samples")
    others = [{**STOPPED, "task": t} for t in report_grid.TASKS
              if t not in ("niah_single", "common_words")]
    run = {"rows": [STOPPED, kept, *others]}
    assert report_grid.task_cells(run, "dense")[(2048, None)] == "measured"
    assert report_grid.kept_tasks(run, 2048) == ["niah_single"]
    text = report_tables.quality_tasks(run)
    assert "0.050 (9 of 32, stopped)" in text
    line = next(x for x in text.splitlines() if x.startswith("| common_words"))
    assert "| 32 |" in line

