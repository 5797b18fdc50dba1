# SPDX-License-Identifier: Apache-2.0
"""Renders BENCHMARKS.md and its plots from the benchmarks' results; optionally runs them first.

    python benchmarks/report.py                 # re-render BENCHMARKS.md + benchmarks/plots/
                                                #   from benchmarks/results/*.json, nothing run
    python benchmarks/report.py --small         # render the *_small.json results into
                                                #   benchmarks/results/BENCHMARKS_small.md
    python benchmarks/report.py --run small     # CI: run the small benchmarks (minutes), render
    python benchmarks/report.py --run full      # run every benchmark (hours on CPU), render
                                [--stages quality,speed,radar_perplexity,load]

Each stage is one benchmark script in a subprocess with its own flags (STAGES below), its
output in benchmarks/results/logs/<stage>[_small].log, with a progress display of the stage
running and its last log line. A stage that fails leaves its results file as it was; the
report is rendered anyway and the command exits non-zero. Each script replaces only its own
device's run in its results file, so GPU runs stay when the CPU reruns.
Hand-written analysis lives in benchmarks/notes/*.md and is included verbatim.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ROOT = HERE.parent
RESULTS = HERE / "results"
METHODS = "dense,radar,recycled,streaming,nats,sparsek"
STAGES = {
    "small": {"quality": ["quality.py", "--small", "--methods", METHODS],
              "speed": ["speed.py", "--small"],
              "load": ["load.py", "--small"]},
    "full": {"speed": ["speed.py", "--contexts", "2048,4096,7680", "--batches", "1,8"],
             "quality": ["quality.py", "--methods", METHODS],
             "radar_perplexity": ["radar_perplexity.py"],
             "load": ["load.py"]},
}


def outputs(small: bool) -> tuple[Path, Path, Path | None]:
    """(markdown file, plots folder, notes folder) of a mode."""
    if small:
        return RESULTS / "BENCHMARKS_small.md", RESULTS / "plots_small", None
    return ROOT / "BENCHMARKS.md", HERE / "plots", HERE / "notes"


def last_line(log: Path) -> str:
    """The log's last progress line (tqdm rewrites its line with carriage returns)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [x.strip() for x in tail.replace("\r", "\n").split("\n") if x.strip()]
    return lines[-1][:100] if lines else ""


def run_stage(name: str, argv: list[str], log: Path, show) -> int:
    """Run one benchmark script, calling show(text) with its last log line while it runs."""
    cmd = [sys.executable, str(HERE / argv[0]), *argv[1:]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                show(last_line(log))
                time.sleep(1)
        except KeyboardInterrupt:
            proc.terminate()   # load.py stops its servers on SIGTERM
            proc.wait()
            raise
    return proc.returncode


class PlainProgress:
    """The part of rich's Progress used here, as plain lines on stderr."""

    def __init__(self):
        self.console = self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    is_terminal = False

    def print(self, text, markup=None, soft_wrap=None):
        print(text, file=sys.stderr, flush=True)

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args):
        pass


def progress_display():
    """rich's progress bar on stderr (the stage running, stages done, time, last log line) on
    a terminal; plain lines elsewhere (CI logs) or without rich."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return PlainProgress()
    if not Console(stderr=True).is_terminal:
        return PlainProgress()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} stages"), TimeElapsedColumn(),
               TextColumn("{task.fields[line]}", markup=False)]
    return Progress(*columns, console=Console(stderr=True), transient=False)


def status_line(progress, bar, stage: str, every: float = 60.0):
    """show(text): on a terminal, the bar's last-line field; elsewhere (CI logs) a printed line
    at most every `every` seconds, when it changed."""
    if getattr(progress.console, "is_terminal", False):
        return lambda text: progress.update(bar, line=text)
    last = {"text": "", "at": time.monotonic()}

    def show(text):
        if text != last["text"] and time.monotonic() - last["at"] >= every:
            progress.console.print(f"{stage}: {text}", markup=False, soft_wrap=True)
            last.update(text=text, at=time.monotonic())
    return show


def run_all(mode: str, stages: list[str]) -> list[str]:
    """Run the stages in order; returns the names of those that failed."""
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    with progress_display() as progress:
        bar = progress.add_task(f"benchmarks ({mode})", total=len(stages), line="")
        for i, name in enumerate(stages, 1):
            argv = STAGES[mode][name]
            log = logs / f"{name}{'_small' if mode == 'small' else ''}.log"
            progress.update(bar, description=f"[{i}/{len(stages)}] {name}", line="")
            progress.console.print(f"{name}: python benchmarks/{' '.join(argv)}  (log: "
                                   f"{log.relative_to(ROOT)})", soft_wrap=True)
            start = time.perf_counter()
            rc = run_stage(name, argv, log, status_line(progress, bar, name))
            took = time.perf_counter() - start
            progress.console.print(f"{name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} "
                                   f"in {took:.0f} s", soft_wrap=True)
            if rc:
                failed.append(name)
                progress.console.print(log.read_text(errors="replace")[-3000:], markup=False,
                                       soft_wrap=True)
            progress.advance(bar)
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", choices=("small", "full"), default=None,
                   help="run the benchmarks of this mode before rendering (implies its results)")
    p.add_argument("--small", action="store_true", help="render the *_small.json results")
    p.add_argument("--stages", default=None, help="comma-separated subset of the mode's stages")
    args = p.parse_args()
    small = args.small or args.run == "small"
    failed = []
    if args.run:
        stages = args.stages.split(",") if args.stages else list(STAGES[args.run])
        unknown = set(stages) - set(STAGES[args.run])
        if unknown:
            p.error(f"unknown stages {sorted(unknown)}; {args.run} has {list(STAGES[args.run])}")
        failed = run_all(args.run, stages)

    from report_render import render

    out_md, plots, notes = outputs(small)
    render(RESULTS, out_md, plots, notes, small=small)
    print(f"wrote {out_md.relative_to(ROOT)} and {plots.relative_to(ROOT)}/")
    if failed:
        print(f"FAILED stages: {', '.join(failed)} (logs in benchmarks/results/logs/)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
