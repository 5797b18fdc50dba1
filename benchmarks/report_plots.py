# SPDX-License-Identifier: Apache-2.0
"""PNG plots of one run (matplotlib, Agg): quality against budget, decode speed against context.

Each function writes its figure into `out_dir` and returns the file's name, or None when the
run has nothing to plot. One panel per context (quality) or batch (speed), one line per method;
dense, which has no budget, is a dashed horizontal line; a method with a learned budget (NAtS)
is one star at x = its measured KV kept share.
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from report_tables import LEARNED, METHOD_ORDER, methods_of  # noqa: E402

COLORS = {m: "black" if m == "dense" else f"C{i}" for i, m in enumerate(METHOD_ORDER)}


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"


def _save(fig, out_dir: Path, name: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return name


def _legend(axes) -> None:
    """One legend for every panel's lines (a method may be missing from some panels)."""
    labels = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    order = methods_of([{"method": label} for label in labels])
    axes[-1].legend([labels[m] for m in order], order, fontsize="small")


def _panels(count: int, width: float = 3.6):
    fig, axes = plt.subplots(1, count, figsize=(width * count + 0.6, 3.2), squeeze=False)
    return fig, list(axes[0])


def _quality_points(rows: list[dict], context: int) -> dict[str, list[tuple]]:
    """method -> [(budget %, value)] at one context; tasks are averaged over the tasks every
    plotted method ran (the tasks dense kept), so each point averages the same tasks."""
    here = [r for r in rows if r["context"] == context]
    tasks = {r.get("task") for r in here if r["method"] != "dense"} or {r.get("task") for r in here}
    points: dict[str, dict] = {}
    for r in here:
        if r.get("task") not in tasks:
            continue
        x = r["fraction"]
        if r["method"] != "dense" and r.get("budget") == LEARNED:
            if r.get("kv_kept") is None:
                continue
            x = r["kv_kept"]        # a learned budget: at its measured KV kept share
        points.setdefault(r["method"], {}).setdefault(x, []).append(r["score"])
    return {m: sorted((None if f is None else 100 * f, sum(v) / len(v)) for f, v in by_f.items()
                      if len(v) == len(tasks))
            for m, by_f in points.items()}


def _learned(rows: list[dict]) -> set[str]:
    return {r["method"] for r in rows if r["method"] != "dense" and r.get("budget") == LEARNED}


def quality_plot(run: dict, kind: str, out_dir: Path) -> str | None:
    """`kind` "perplexity" or "task": value against budget, one panel per context."""
    rows = [r for r in run.get("rows", []) if r["kind"] == kind]
    contexts = sorted({r["context"] for r in rows})
    if not contexts:
        return None
    learned = _learned(rows)
    fig, axes = _panels(len(contexts))
    for ax, context in zip(axes, contexts):
        points = _quality_points(rows, context)
        for method in methods_of([{"method": m} for m in points]):
            xs = [x for x, _ in points[method]]
            ys = [y for _, y in points[method]]
            if method == "dense" and ys:
                ax.axhline(ys[0], color="black", linestyle="--", label="dense")
            elif method in learned and ys:
                ax.plot(xs, ys, marker="*", markersize=11, linestyle="none", label=method,
                        color=COLORS.get(method))
            elif ys:
                ax.plot(xs, ys, marker="o", label=method, color=COLORS.get(method))
        ticks = sorted({round(x, 1) for m, pts in points.items() if m != "dense"
                        for x, _ in pts})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.set_title(f"context {context:,}")
        ax.set_xlabel("budget (% of context)" + (f"; {', '.join(sorted(learned))}: KV kept"
                                                 if learned else ""))
    axes[0].set_ylabel("perplexity (lower is better)" if kind == "perplexity"
                       else "task score (mean over tasks)")
    _legend(axes)
    fig.suptitle(f"{run.get('device', '?')}: {kind} against budget", fontsize="medium")
    return _save(fig, out_dir, f"quality_{kind}_{slug(run.get('device', '?'))}.png")


def speed_plot(run: dict, out_dir: Path) -> str | None:
    """Decode tokens/s against context, one panel per batch size."""
    rows = run.get("rows", [])
    batches = sorted({r["batch"] for r in rows})
    if not batches:
        return None
    fig, axes = _panels(len(batches))
    for ax, batch in zip(axes, batches):
        here = [r for r in rows if r["batch"] == batch]
        for method in methods_of(here):
            points = sorted((r["context"], r["decode_tok_s"]) for r in here if r["method"] == method)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method,
                    color=COLORS.get(method), linestyle="--" if method == "dense" else "-")
        ax.set_xticks(sorted({r["context"] for r in here}))
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context (tokens)")
    axes[0].set_ylabel("decode tokens/s")
    _legend(axes)
    fig.suptitle(f"{run.get('device', '?')}: decode speed against context", fontsize="medium")
    return _save(fig, out_dir, f"speed_decode_{slug(run.get('device', '?'))}.png")


def load_plot(run: dict, out_dir: Path) -> str | None:
    """Running requests and KV-pool use against time under load.py's load, one line per
    backend (the server's gauges, sampled once a second); None for runs without samples."""
    runs = {b: r["gauge_samples"] for b, r in run.get("runs", {}).items()
            if r.get("gauge_samples")}
    if not runs:
        return None
    fig, axes = _panels(2, width=4.4)
    for backend in methods_of([{"method": b} for b in runs]):
        samples = runs[backend]
        style = dict(label=backend, color=COLORS.get(backend),
                     linestyle="--" if backend == "dense" else "-")
        t = [s["t"] for s in samples]
        axes[0].plot(t, [s["running"] or 0 for s in samples], **style)
        axes[1].plot(t, [100 * (s["kv_usage"] or 0) for s in samples], **style)
    axes[0].set_ylabel("running requests")
    axes[1].set_ylabel("KV pool in use (%)")
    for ax in axes:
        ax.set_xlabel("time into the load (s)")
    _legend(axes)
    blocks = run.get("settings", {}).get("kv_blocks")
    pool = f", KV pool {blocks} blocks" if blocks else ""
    fig.suptitle(f"{run.get('device', '?')}: under load{pool}", fontsize="medium")
    name = slug(f"{run.get('device', '?')} {run.get('scenario') or ''}")
    return _save(fig, out_dir, f"load_{name}.png")
