# SPDX-License-Identifier: Apache-2.0
"""benchmarks/speed.py --merge: measured cells replace whole cells (every method of a
(context, batch) comes from one run), other cells are kept, mismatched runs are refused."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from speed import merge_cells, sparse_config  # noqa: E402


def _row(method, context, batch, tok_s):
    return {"method": method, "context": context, "batch": batch, "decode_tok_s": tok_s}


def _run(rows, date="d1", tokens=32):
    return {"date": date, "command": f"speed {date}", "new_tokens": tokens, "model": "m",
            "dtype": "float32", "device": "cpu", "rows": rows}


def test_measured_cells_replace_whole_cells():
    old = _run([_row("dense", 2048, 1, 10), _row("radar", 2048, 1, 5),
                _row("dense", 4096, 1, 8), _row("radar", 4096, 1, 4)])
    new = _run([_row("dense", 2048, 1, 11), _row("nats", 2048, 1, 7),
                _row("dense", 7680, 8, 3), _row("radar", 7680, 8, 2)], date="d2")
    merged = merge_cells(old, new)
    cells = {(r["method"], r["context"], r["batch"]): r["decode_tok_s"] for r in merged["rows"]}
    assert cells == {("dense", 2048, 1): 11, ("nats", 2048, 1): 7,          # replaced cell
                     ("dense", 4096, 1): 8, ("radar", 4096, 1): 4,          # kept cell
                     ("dense", 7680, 8): 3, ("radar", 7680, 8): 2}          # new cell
    assert merged["merged"][-1]["cells"] == [(2048, 1), (7680, 8)]
    assert merged["merged"][-1]["rows"] == 4        # shown in the report's "Merged into" line
    assert merged["date"] == "d1" and merge_cells(None, new) is new


def test_a_merge_records_the_code_it_measured():
    from report_tables import run_header

    new = {**_run([_row("dense", 2048, 1, 11)], date="d2"),
           "versions": {"vllm": "0.32.0", "vllm_sparse": "abc1234+dirty"}}
    merged = merge_cells(_run([_row("dense", 4096, 1, 8)]), new)
    assert merged["merged"][-1]["versions"]["vllm_sparse"] == "abc1234+dirty"
    assert "date: d2; code: abc1234+dirty): `speed d2`" in run_header(merged)


def test_mismatched_runs_are_refused():
    with pytest.raises(ValueError, match="new_tokens 32 \\(stored\\) vs 8"):
        merge_cells(_run([]), _run([], tokens=8))


def test_method_configs():
    assert sparse_config("nats", 512) == ("nats", {})
    assert sparse_config("sparsek", 512) == ("sparsek", {"budget": 512})
    assert sparse_config("streaming", 512)[1]["radar"] == {"num_sink_tokens": 4, "local_window": 508}


def test_importing_the_benchmarks_leaves_the_environment_alone():
    """Tests import these modules; their engine settings (e.g. VLLM_LOGGING_LEVEL=ERROR) are
    set only when they run, or they would leak into every later test's engines."""
    import os
    import subprocess

    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    code = ("import os, sys; before = dict(os.environ); sys.path.insert(0, sys.argv[1]); "
            "import quality, speed, load, report; "
            "changed = sorted(k for k in set(before) | set(os.environ) "
            "if before.get(k) != os.environ.get(k)); print(changed); assert not changed")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_", "OMP_", "HF_", "TOKENIZERS_"))}
    proc = subprocess.run([sys.executable, "-c", code, str(benchmarks)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
