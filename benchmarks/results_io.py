# SPDX-License-Identifier: Apache-2.0
"""Reading and writing benchmarks/results/*.json, shared by the benchmark scripts and report.py.

A results file is a list of runs, at most one per device ("cpu" or the GPU's name) and
scenario (a run's optional "scenario", e.g. load.py's fixed KV pool): a rerun replaces the run
of its own device and scenario and keeps every other, so a CPU rerun never drops GPU rows.
Files written before this module are read too: `{"runs": [...]}` (speed.py) and a single run
(load.py, radar_perplexity.py).
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_runs(path: Path) -> list[dict]:
    """Every run in a results file (none if it does not exist), whichever layout it has."""
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return data
    if isinstance(data.get("runs"), list):
        return data["runs"]
    return [data]


def save_run(path: Path, run: dict) -> None:
    """Append `run` to the file, replacing an earlier run of the same device and scenario,
    keeping the others."""
    path = Path(path)
    key = (run["device"], run.get("scenario"))
    runs = [r for r in read_runs(path) if (r.get("device"), r.get("scenario")) != key] + [run]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=2) + "\n")
    tmp.replace(path)


def command_line() -> str:
    """This process's command line, with the script's path relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


# Written by the benchmarks themselves: a change here does not make the measured code dirty.
RESULT_PATHS = ("BENCHMARKS.md", "benchmarks/results", "benchmarks/plots", "benchmarks/notes")


def git_revision() -> str | None:
    """The repository's short commit, "+dirty" when tracked files other than results and notes
    differ from it; None outside a git checkout. Recorded in each run's versions, so a number
    names the code it measured."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *(f":(exclude){p}" for p in RESULT_PATHS)],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.TimeoutExpired):
        return None
