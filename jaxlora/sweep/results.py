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

_METRIC_ORDER = ("val_loss", "val_loss_before", "train_loss", "val_ppl", "tokens_per_s",
                 "peak_rss_mb", "adapter_params", "adapter_bytes", "base_bytes", "wall_s")
_NOT_METRICS = ("name", "model", "qtype")
"""Summary keys the table leaves out: the run's name (its own column), the model's path and
qtype (in each run's config.toml; a swept `quant.qtype` is a column of its own)."""
_PLOTTED = {"val_loss": "held-out loss", "train_loss": "training loss (last step)",
            "tokens_per_s": "throughput (tokens/s)", "peak_rss_mb": "peak RSS (MiB)",
            "wall_s": "wall time (s)", "adapter_bytes": "adapter size (bytes)"}
"""The metrics plotted against each axis, with their axis labels."""


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
        keys += [k for k in r.metrics if k not in keys and k not in _NOT_METRICS]
    return keys


def write_results(folder: Path, runs: Sequence[RunResult], axes: Sequence[str]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md``: one row per run, the swept values first, then the
    metrics, then the run's status, name and error."""
    metrics = _metric_keys(runs)
    header = [*axes, *metrics, "status", "run", "error"]
    rows = []
    for r in runs:
        rows.append([*(r.overrides.get(a, "") for a in axes),
                     *(r.metrics.get(m, "") for m in metrics), r.status, r.name, r.error or ""])
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


def _axis_plot(folder: Path, done: Sequence[RunResult], axes: Sequence[str], x_axis: str,
               metrics: Sequence[str]) -> Path:
    """``metrics_vs_<axis>.png``: a panel per metric against `x_axis` (numeric, or categories
    in sweep order), one line per combination of the other axes' values."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    values = [r.overrides.get(x_axis) for r in done]
    numeric = all(_is_num(v) for v in values)
    cats = list(dict.fromkeys(format_value(v) for v in values))
    pos = (lambda v: v) if numeric else (lambda v: cats.index(format_value(v)))
    others = [a for a in axes if a != x_axis]
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=100, layout="constrained")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in done:
            if _is_num(r.metrics.get(metric)):
                label = ", ".join(f"{a}={format_value(r.overrides.get(a))}" for a in others)
                lines.setdefault(label, []).append((pos(r.overrides[x_axis]), r.metrics[metric]))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
        if numeric and min(values) > 0 and max(values) / min(values) >= 16:
            ax.set_xscale("log", base=2)
        if not numeric:
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(x_axis)
        ax.set_ylabel(_PLOTTED[metric])
        ax.grid(True, alpha=0.3)
    if others:  # below the panels, where it covers no point
        fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center",
                   fontsize=7, ncols=2)
    fig.suptitle(f"sweep metrics against {x_axis}")
    path = folder / f"metrics_vs_{x_axis.replace('.', '_')}.png"
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def plot_results(folder: Path, runs: Sequence[RunResult], axes: Sequence[str]) -> list[Path]:
    """PNG plots of a sweep; returns the paths written (possibly none).

    * ``metrics_vs_<axis>.png`` for every axis with more than one value among the finished
      runs: a panel per metric (held-out and training loss, throughput, peak memory, wall
      time, adapter size), one line per combination of the other axes' values.
    * ``loss_curves.png``: each run's training loss and, beside it, its held-out loss over the
      steps, from its ``metrics.jsonl``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in runs if r.status == "done"]
    metrics = [m for m in _PLOTTED if any(_is_num(r.metrics.get(m)) for r in done)]
    written = [_axis_plot(folder, done, axes, a, metrics) for a in axes
               if metrics and len({format_value(r.overrides.get(a)) for r in done}) > 1]
    curves = {r.name: c for r in runs if (c := _read_curves(r.run_dir / "metrics.jsonl"))[0]}
    if curves:
        fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
        panels = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
        for name, (train, held) in curves.items():
            line, = panels[0].plot(*zip(*train, strict=True), label=name, linewidth=1)
            if held:
                panels[1].plot(*zip(*held, strict=True), marker=".", color=line.get_color(),
                               label=name, linewidth=1)
        for ax, what in zip(panels, ("training loss", "held-out loss"), strict=True):
            ax.set_xlabel("step")
            ax.set_ylabel(what)
            ax.set_title(what)
            ax.grid(True, alpha=0.3)
        panels[0].legend(fontsize=6, ncol=2 if len(curves) > 8 else 1)
        path = folder / "loss_curves.png"
        FigureCanvasAgg(fig).print_png(str(path))
        written.append(path)
    return written


def _read_curves(path: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(training loss, held-out loss) points ``(step, value)`` of a metrics.jsonl."""
    train, held = [], []
    try:
        with path.open() as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by an interrupt
                if not isinstance(rec, dict) or not _is_num(rec.get("step")):
                    continue
                for key, pts in (("loss", train), ("val_loss", held)):
                    if _is_num(rec.get(key)):
                        pts.append((rec["step"], rec[key]))
    except OSError:
        pass
    return sorted(train), sorted(held)
