# SPDX-License-Identifier: Apache-2.0
"""benchmarks/report.py renders small synthetic results: numbers and ratios in the tables,
targets classified hit / missed / not measured, PNGs written, notes included verbatim, and no
device's runs lost when another device's run is saved, and the code revision a run records."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import report  # noqa: E402
import report_render  # noqa: E402
import report_targets  # noqa: E402
from results_io import read_runs, save_run  # noqa: E402

GPU = "NVIDIA H100 80GB HBM3"


def meta(device, **extra):
    return {"device": device, "machine": f"test machine for {device}", "date": "2026-01-02",
            "versions": {"vllm": "0.32.0", "torch": "2.13.0"}, "command": f"python x.py # {device}",
            **extra}


def ppl(context, method, score, fraction=None):
    budget = None if fraction is None else int(fraction * context)
    return {"kind": "perplexity", "context": context, "method": method, "score": score,
            "fraction": fraction, "budget": budget, "windows": 4}


def task(name, context, method, score, fraction=None):
    row = {**ppl(context, method, score, fraction), "kind": "task", "task": name, "samples": 32}
    del row["windows"]
    return row


def speed_row(context, batch, method, tok_s, ttft):
    return {"context": context, "batch": batch, "method": method, "decode_tok_s": tok_s,
            "ttft_s": ttft, "budget": None if method == "dense" else context // 4}


CPU_QUALITY = meta("cpu", rows=[
    ppl(7680, "dense", 10.0), ppl(7680, "radar", 10.2, 0.25), ppl(7680, "streaming", 12.5, 0.25),
    ppl(7680, "radar", 10.05, 0.5), ppl(7680, "recycled", 11.0, 0.5),
    task("niah_single", 7680, "dense", 1.0), task("niah_single", 7680, "radar", 0.9, 0.25),
    task("niah_single", 7680, "streaming", 0.5, 0.25),
    task("niah_multikey", 7680, "dense", 0.8), task("niah_multikey", 7680, "radar", 0.8, 0.25),
    task("niah_multikey", 7680, "streaming", 0.2, 0.25),
    task("common_words", 7680, "dense", 0.9), task("common_words", 7680, "radar", 0.1, 0.25)])
GPU_QUALITY = meta(GPU, rows=[ppl(2048, "dense", 8.0), ppl(2048, "radar", 8.4, 0.25),
                              ppl(4096, "dense", 7.0), ppl(4096, "radar", 7.14, 0.125)])
CPU_SPEED = meta("cpu", rows=[speed_row(4096, 8, "dense", 100.0, 2.0),
                              speed_row(4096, 8, "radar", 140.0, 2.5),
                              speed_row(2048, 1, "dense", 30.0, 0.5),
                              speed_row(2048, 1, "radar", 24.0, 0.6)])
LOAD = meta("cpu", settings={"requests": 10, "concurrency": 2}, ok=True, runs={
    "dense": {"latency_p50_s": 2.0, "requests_per_s": 5.0, "errors": 0},
    "radar": {"latency_p50_s": 3.0, "requests_per_s": 4.0, "errors": 0}})
RADAR_PPL = {"device": "cpu", "machine": "m", "date": "2026-11-23", "versions": {"vllm": "0.32.0"},
             "context": 4096, "windows": 4, "budget": 0.25, "score_from": 2048,
             "dense": {"ppl": 7.67}, "radar": {"ppl": 8.3157}}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality.json").write_text(json.dumps([GPU_QUALITY, CPU_QUALITY]))
    (results / "speed.json").write_text(json.dumps({"runs": [CPU_SPEED]}))  # speed.py's old layout
    (results / "load.json").write_text(json.dumps(LOAD))                     # load.py's old layout
    (results / "radar_perplexity.json").write_text(json.dumps(RADAR_PPL))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "intro.md").write_text("INTRO NOTE kept verbatim.\n")
    (notes / "radar_estimator.md").write_text("| study | 1.084 |\n|---|---|\n")
    out = report_render.render(results, tmp_path / "BENCHMARKS.md", tmp_path / "plots", notes)
    return out.read_text(), tmp_path


def section(md: str, heading: str) -> str:
    return md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def rows_of(md: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_quality_tables_hold_values_and_ratios_to_dense(rendered):
    md, _ = rendered
    quarter, half = rows_of(section(md, "Quality"), "7,680")
    assert quarter[:3] == ["7,680", "4", "25% (1,920)"]     # context, windows, budget
    # recycled ran at 50% only
    assert quarter[3:] == ["10.000", "10.200 (×1.020)", "—", "12.500 (×1.250)"]
    assert half[3:] == ["10.000", "10.050 (×1.005)", "11.000 (×1.100)", "—"]
    single = rows_of(md, "niah_single")[0]
    assert single[2] == "32" and single[4:] == ["1.000", "0.900 (×0.900)", "0.500 (×0.500)"]
    multikey = rows_of(md, "niah_multikey")[0]
    assert multikey[4:] == ["0.800", "0.800 (×1.000)", "0.200 (×0.250)"]


def test_speed_load_and_radar_perplexity_tables(rendered):
    md = section(rendered[0], "Decode speed")
    decode = rows_of(md, "4,096")
    assert decode[0][1:] == ["8", "1,024", "100.0", "140.0 (×1.400)"]
    assert decode[1][1:] == ["8", "1,024", "2.00", "2.50 (×1.250)"]  # TTFT table
    assert rows_of(md, "2,048")[0][3:] == ["30.0", "24.0 (×0.800)"]
    md = rendered[0]
    assert rows_of(md, "latency p50 (s)")[0][1:] == ["2.000", "3.000 (×1.500)"]
    assert rows_of(md, "requests/s")[0][1:] == ["5.000", "4.000 (×0.800)"]
    assert rows_of(md, "errors")[0][1:] == ["0", "0"]
    radar = rows_of(md, "Radar")[0]
    assert radar[2:] == ["8.316", f"{8.3157 / 7.67:.3f}"]


def test_each_run_shows_its_device_machine_versions_date_and_command(rendered):
    md, _ = rendered
    for device in ("cpu", GPU):
        assert f"### {device}" in md
        assert f"machine: test machine for {device}" in md
        assert f"Command: `python x.py # {device}`" in md
    assert "vllm 0.32.0, torch 2.13.0; date: 2026-01-02" in md
    # radar_perplexity.py's record has every flag, so its command is rebuilt exactly
    assert ("`python benchmarks/radar_perplexity.py --context 4096 --windows 4 --budget 0.25 "
            "--score-from 2048`") in md


def test_targets_are_classified(rendered):
    md, _ = rendered
    status = {(r[0], r[3]): (r[4], r[5], r[6])
              for t in report_targets.TARGETS for r in rows_of(md, t.name)}
    needle_radar = (0.9 + 0.8) / (1.0 + 0.8)       # common_words is not a needle task
    needle_streaming = (0.5 + 0.2) / (1.0 + 0.8)
    assert status[("Radar perplexity within 3% of dense", "cpu")][:2] == \
        ("**hit**", f"{10.2 / 10.0:.3f} (quality.py)")
    assert status[("Radar needle accuracy at least 95% of dense", "cpu")][:2] == \
        ("**missed**", f"{needle_radar:.3f} (quality.py)")
    assert status[("StreamingLLM visibly worse on needle tasks", "cpu")][:2] == \
        ("**hit**", f"{needle_streaming:.3f} (quality.py)")
    # the GPU has 2K and 4K cells only: not measured, the nearest is 4K at 12.5%
    assert status[("Radar perplexity within 3% of dense", GPU)] == (
        "not measured", "—",
        f"context 4,096, budget 12.5%: {7.14 / 7.0:.3f} (quality.py; would pass)")
    # speed: 7.5K not run; the nearest cell (4K, batch 8) would pass
    assert status[("Radar decode tokens/s at least 1.3x dense (CPU engine)", "cpu")] == (
        "not measured", "—", "context 4,096, batch 8: 1.400 (speed.py; would pass)")


def test_targets_without_any_run_are_not_measured():
    rows = report_targets.classify_all({b: [] for b in report_render.BENCHES})
    assert len(rows) == len(report_targets.TARGETS)
    assert {r["status"] for r in rows} == {"not measured"} and not any(r["nearest"] for r in rows)


def test_speed_target_ignores_gpu_runs():
    gpu = meta(GPU, rows=[speed_row(7680, 8, "dense", 100.0, 1.0),
                          speed_row(7680, 8, "radar", 200.0, 1.0)])
    rows = report_targets.classify(report_targets.TARGETS[3], {"speed": [gpu]})
    assert [r["status"] for r in rows] == ["not measured"] and rows[0]["device"] is None


def test_pngs_written_and_embedded(rendered):
    md, tmp = rendered
    names = {"quality_perplexity_cpu.png", "quality_task_cpu.png", "speed_decode_cpu.png",
             "quality_perplexity_nvidia-h100-80gb-hbm3.png"}
    assert names <= {p.name for p in (tmp / "plots").glob("*.png")}
    for name in names:
        assert (tmp / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in md


def test_notes_included_verbatim_in_place(rendered):
    md, _ = rendered
    assert "INTRO NOTE kept verbatim." in md and "| study | 1.084 |" in md
    assert md.index("INTRO NOTE") < md.index("## Targets")
    estimator = md.index("| study | 1.084 |")
    assert md.index("## Radar perplexity") < estimator < md.index("## Decode speed")


def test_methods_table_lists_unmeasured_methods(rendered):
    md, _ = rendered
    assert rows_of(md, "recycled")[0][1:] == ["cpu", "not measured", "not measured", "not measured"]
    assert rows_of(md, "radar")[0][1:] == [f"{GPU}, cpu", "cpu", "cpu", "cpu"]


@pytest.mark.parametrize("layout", ["list", "runs", "single"])
def test_a_cpu_run_keeps_gpu_runs(tmp_path, layout):
    path = tmp_path / "quality.json"
    old = {"list": [GPU_QUALITY], "runs": {"runs": [GPU_QUALITY]}, "single": GPU_QUALITY}[layout]
    path.write_text(json.dumps(old))
    save_run(path, CPU_QUALITY)
    save_run(path, {**CPU_QUALITY, "date": "2026-02-03"})  # a CPU rerun replaces the CPU run only
    runs = read_runs(path)
    assert [r["device"] for r in runs] == [GPU, "cpu"]
    assert runs[0] == GPU_QUALITY and runs[1]["date"] == "2026-02-03"
    md = report_render.document(report_render.load_results(tmp_path, small=False),
                                tmp_path / "plots", "plots", None, small=False)
    assert f"### {GPU}" in md and "8.400 (×1.050)" in md


def test_a_run_of_another_scenario_is_kept_and_titled(tmp_path):
    path = tmp_path / "load.json"
    pool = {**LOAD, "scenario": "KV pool of 192 blocks", "date": "2026-11-24"}
    save_run(path, LOAD)
    save_run(path, pool)
    save_run(path, {**pool, "date": "2026-11-25"})           # replaces its own scenario only
    runs = read_runs(path)
    assert [(r.get("scenario"), r["date"]) for r in runs] == [
        (None, LOAD["date"]), ("KV pool of 192 blocks", "2026-11-25")]
    md = report_render.document(report_render.load_results(tmp_path, small=False),
                                tmp_path / "plots", "plots", None, small=False)
    assert "### cpu\n" in md and "### cpu: KV pool of 192 blocks\n" in md


def test_git_revision_is_dirty_for_code_changes_only(tmp_path, monkeypatch):
    import subprocess

    import results_io

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "speed.json").write_text("[]\n")
    git("add", "-A")
    git("commit", "-qm", "c")
    monkeypatch.setattr(results_io, "ROOT", tmp_path)
    rev = results_io.git_revision()
    assert len(rev) >= 7 and all(c in "0123456789abcdef" for c in rev)
    (tmp_path / "benchmarks" / "results" / "speed.json").write_text("[{}]\n")
    assert results_io.git_revision() == rev           # a results file written by a run
    (tmp_path / "code.py").write_text("x = 2\n")
    assert results_io.git_revision() == rev + "+dirty"


def test_small_mode_never_writes_the_committed_report():
    md, plots, notes = report.outputs(small=True)
    assert md.parent == report.RESULTS and plots.parent == report.RESULTS and notes is None
    assert report.outputs(small=False)[0] == report.ROOT / "BENCHMARKS.md"


def test_runner_logs_each_stage_and_reports_failures(tmp_path, monkeypatch):
    ok, bad = tmp_path / "ok.py", tmp_path / "bad.py"
    ok.write_text("print('stage ran')\n")
    bad.write_text("import sys\nprint('broken')\nsys.exit(3)\n")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "STAGES", {"small": {"ok": [str(ok)], "bad": [str(bad)]}})
    assert report.run_all("small", ["ok", "bad"]) == ["bad"]
    assert "stage ran" in (tmp_path / "logs" / "ok_small.log").read_text()
    assert "broken" in (tmp_path / "logs" / "bad_small.log").read_text()


def test_grid_coverage_section_rendered(rendered):
    md = section(rendered[0], "Grid coverage")
    radar = rows_of(md, "cpu")[1]     # dense first, then radar
    assert radar[1] == "radar" and radar[2].startswith("2 of 12; missing 1,024 (all)")
    assert rows_of(md, GPU)[1][4] == "—"    # no GPU speed run


def test_load_table_shows_the_servers_gauges_when_sampled():
    from report_tables import load_table

    gauges = {"running_mean": 4.0, "running_peak": 6, "waiting_mean": 8.0,
              "kv_usage_mean": 0.9, "kv_tokens_per_running": 1000.0}
    run = {"runs": {"dense": {"requests_per_s": 1.0, **gauges},
                    "nats": {"requests_per_s": 1.5, **gauges, "running_mean": 10.0,
                             "running_peak": 12, "kv_tokens_per_running": 250.0}}}
    md = load_table(run)
    assert rows_of(md, "running requests, mean")[0][1:] == ["4.000", "10.000 (×2.500)"]
    assert rows_of(md, "running requests, peak")[0][1:] == ["6", "12"]
    assert rows_of(md, "KV held per running request (tokens)")[0][1:] == [
        "1,000.000", "250.000 (×0.250)"]
    assert "running requests" not in load_table(LOAD)      # a run without samples: no rows


def test_load_plot_only_for_runs_with_gauge_samples(tmp_path):
    import report_plots

    samples = [{"t": float(t), "running": float(t % 3), "waiting": 0.0, "kv_usage": 0.1 * t}
               for t in range(5)]
    run = {"device": "cpu", "settings": {"kv_blocks": 192},
           "runs": {"dense": {"gauge_samples": samples}, "nats": {"gauge_samples": samples}}}
    name = report_plots.load_plot(run, tmp_path)
    assert name == "load_cpu.png" and (tmp_path / name).stat().st_size > 1000
    assert report_plots.load_plot(LOAD, tmp_path) is None
