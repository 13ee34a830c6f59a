"""Sweep results: the table (``results.csv``, ``results.md``) and the plots of a sweep.

`jaxlora.sweep.run_sweep` writes these after every invocation, from one `RunResult` per run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["RunResult", "format_value", "write_results", "plot_results"]

_METRIC_ORDER = ("train_loss", "val_loss", "tokens_per_s", "peak_rss_mb", "adapter_bytes", "wall_s")


@dataclasses.dataclass
class RunResult:
    """One run of a sweep after running (or skipping) it."""

    name: str
    run_dir: Path
    overrides: dict[str, Any]
    status: str  # "done" | "failed"
    metrics: dict[str, Any]
    error: str | None = None
    skipped: bool = False  # finished in an earlier invocation


def format_value(value: Any) -> str:
    """A swept value as run names and result tables print it (``1e-05``, ``q_proj+v_proj``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}:{format_value(v)}" for k, v in value.items())
    return str(value)


def _metric_keys(runs: Sequence[RunResult]) -> list[str]:
    keys: list[str] = [k for k in _METRIC_ORDER if any(k in r.metrics for r in runs)]
    for r in runs:
        keys += [k for k in r.metrics if k not in keys]
    return keys


def write_results(folder: Path, runs: Sequence[RunResult], axes: Sequence[str]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md``: one row per run, swept values then metrics."""
    metrics = _metric_keys(runs)
    header = ["run", "status", *axes, *metrics, "error"]
    rows = []
    for r in runs:
        rows.append([r.name, r.status, *(r.overrides.get(a, "") for a in axes),
                     *(r.metrics.get(m, "") for m in metrics), r.error or ""])
    csv_path, md_path = folder / "results.csv", folder / "results.md"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows([[format_value(v) if isinstance(v, (bool, list, dict)) else v for v in row] for row in rows])

    def cell(v: Any) -> str:
        s = f"{v:.4g}" if isinstance(v, float) else format_value(v) if v != "" else ""
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_results(folder: Path, runs: Sequence[RunResult], axes: Sequence[str]) -> list[Path]:
    """PNG plots of a sweep; returns the paths written (possibly none).

    * ``<metric>_vs_<axis>.png``: val_loss (else train_loss) against the first numeric axis
      with more than one value, one line per combination of the other axes' values.
    * ``loss_curves.png``: each run's training loss from its ``metrics.jsonl`` lines that
      hold ``step`` and ``loss``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    written: list[Path] = []
    done = [r for r in runs if r.status == "done"]
    metric = next((m for m in ("val_loss", "train_loss") if any(_is_num(r.metrics.get(m)) for r in done)), None)
    x_axis = next(
        (a for a in axes
         if len({format_value(r.overrides.get(a)) for r in done}) > 1
         and all(_is_num(r.overrides.get(a)) for r in done)),
        None,
    )
    if metric and x_axis:
        others = [a for a in axes if a != x_axis]
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in done:
            if _is_num(r.metrics.get(metric)):
                label = ", ".join(f"{a.rsplit('.', 1)[-1]}={format_value(r.overrides.get(a))}" for a in others)
                lines.setdefault(label or metric, []).append((r.overrides[x_axis], r.metrics[metric]))
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        xs = [r.overrides[x_axis] for r in done]
        if min(xs) > 0 and max(xs) / min(xs) >= 16:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x_axis)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {x_axis}")
        ax.grid(True, alpha=0.3)
        if len(lines) > 1 or others:
            ax.legend(fontsize=8)
        path = folder / f"{metric}_vs_{x_axis.replace('.', '_')}.png"
        FigureCanvasAgg(fig).print_png(str(path))
        written.append(path)

    curves = {r.name: c for r in runs if (c := _read_curve(r.run_dir / "metrics.jsonl"))}
    if curves:
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        for name, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("loss curves")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(curves) > 8 else 1)
        path = folder / "loss_curves.png"
        FigureCanvasAgg(fig).print_png(str(path))
        written.append(path)
    return written


def _read_curve(path: Path) -> list[tuple[float, float]]:
    pts = []
    try:
        with path.open() as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by an interrupt
                if isinstance(rec, dict) and _is_num(rec.get("step")) and _is_num(rec.get("loss")):
                    pts.append((rec["step"], rec["loss"]))
    except OSError:
        return []
    return sorted(pts)
