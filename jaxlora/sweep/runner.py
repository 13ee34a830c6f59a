"""The resumable sweep runner: every run of a sweep, one at a time or as populations.

Finished runs are skipped (their ``sweep_status.json`` says ``done`` and the config still
matches), failed runs are recorded and tried again by the next invocation, and the results
table and plots are written after every invocation (`jaxlora.sweep.results`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from jaxlora.config import Config, Overrides, config_hash, dump_config, load_config
from jaxlora.errors import ConfigError
from jaxlora.sweep.results import RunResult, format_value, plot_results, write_results
from jaxlora.sweep.spec import RunSpec, Sweep, expand, load_sweep, sweep_dir

__all__ = ["RunFn", "STATUS_FILE", "SweepResult", "run_sweep"]

RunFn = Callable[[Config, Path], Mapping[str, Any] | None]
STATUS_FILE = "sweep_status.json"  # written by the runner into each run directory


@dataclasses.dataclass
class SweepResult:
    out_dir: Path
    runs: list[RunResult]
    csv_path: Path
    md_path: Path
    plots: list[Path]


def _scalar_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {}
    for k, v in (metrics or {}).items():
        if hasattr(v, "item") and callable(v.item):  # numpy / jax scalars
            try:
                v = v.item()
            except (TypeError, ValueError):
                continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[str(k)] = v
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)  # atomic: an interrupt never leaves half a status file


def run_sweep(
    sweep: Sweep | str | os.PathLike,
    run_fn: RunFn,
    *,
    out_dir: str | os.PathLike | None = None,
    overrides: Overrides | None = (),
    log: Callable[[str], None] | None = print,
    population: Any = None,
    population_size: int | None = None,
    check: Callable[[Any], None] | None = None,
) -> SweepResult:
    """Run every run of a sweep that has not finished yet, then write results and plots.

    Args:
      sweep: a Sweep or the path of a sweep TOML file.
      run_fn: ``run_fn(config, run_dir) -> metrics`` (e.g. ``jaxlora.train.run``); returns a
        mapping of final metrics (scalars are kept; when it returns None, the scalars of
        ``run_dir/summary.json`` are used). It may find a partly written run_dir
        and should resume from it.
      out_dir: the sweep folder (default: see :func:`sweep_dir`).
      overrides: applied to every run (see :func:`expand`); a finished run whose config they
        change is reported as failed ("different config"), not silently reused.
      log: called with one line per run; ``None`` for silence.
      population: `jaxlora.population` (or an object with its ``group_key``, ``plan_size`` and
        ``run``): runs whose base-side settings agree train together as populations, each
        member into its own run directory. None: one run at a time.
      population_size: members per population (default: the sweep file's
        ``population_size``, else as many as the memory estimate allows; 1 = one at a time).
      check: called with every run's config before any run starts (e.g.
        `jaxlora.train.assemble.check_targets`); its error ends the sweep before it trains.
    Returns:
      SweepResult with every run's status and metrics and the paths written.

    A run is finished when its ``sweep_status.json`` says ``done`` and its ``config.toml``
    still matches; finished runs are not run again. Failed runs (an exception from run_fn) are
    recorded with their error and retried by the next invocation. KeyboardInterrupt stops the
    sweep after writing the results collected so far.
    """
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    specs = expand(sweep, out_dir=out_dir, overrides=overrides)
    for spec in specs if check is not None else ():
        check(spec.config)
    folder = sweep_dir(sweep, out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    _write_json(folder / "sweep.json", {
        "sweep": str(sweep.path), "base": str(sweep.base), "axes": sweep.axes,
        "runs": [{"name": s.name, "overrides": dict(s.overrides)} for s in specs],
    })

    results: list[RunResult] = []
    size = population_size if population_size is not None else sweep.population_size
    try:
        results.extend(_run_all(specs, folder, run_fn, population, size, say))
    finally:
        order = {s.name: i for i, s in enumerate(specs)}
        results.sort(key=lambda r: order[r.name])
        csv_path, md_path = write_results(folder, results, sweep.axes)
        plots = plot_results(folder, results, sweep.axes)
    return SweepResult(folder, results, csv_path, md_path, plots)


def _current_hash(run_dir: Path, recorded: str) -> str:
    """The hash of the run's `config.toml` as this version reads it: a field added since the
    run was recorded takes its default, so the run still counts as the same config (the
    recorded hash when the file is missing or no longer reads)."""
    try:
        return config_hash(load_config(run_dir / "config.toml"))
    except (ConfigError, OSError):
        return recorded


def _prior(spec: RunSpec, run_dir: Path, tag: str, say: Callable[[str], None]
           ) -> RunResult | None:
    """The recorded result of a run that needs no running (done before, or a folder of
    another config), else None."""
    prior = _read_status(run_dir / STATUS_FILE)
    digest = config_hash(spec.config)
    if prior.get("config_hash") not in (None, digest):
        prior["config_hash"] = _current_hash(run_dir, prior["config_hash"])
    if prior.get("status") == "done" and prior.get("config_hash") == digest:
        say(f"{tag}: done before, skipped")
        return RunResult(spec.name, run_dir, dict(spec.overrides), "done",
                         prior.get("metrics", {}), skipped=True)
    if prior.get("config_hash") not in (None, digest):
        msg = f"{run_dir} holds a run of a different config; remove it or rename the sweep"
        say(f"{tag}: FAILED: {msg}")
        return RunResult(spec.name, run_dir, dict(spec.overrides), "failed", {}, msg)
    return None


def _start(spec: RunSpec, run_dir: Path, tag: str, say: Callable[[str], None]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_config(spec.config))
    _write_json(run_dir / STATUS_FILE, {"status": "running", "config_hash": config_hash(spec.config)})
    say(f"{tag}: running")


def _failed(spec: RunSpec, run_dir: Path, e: Exception, tag: str,
            say: Callable[[str], None]) -> RunResult:
    err = f"{type(e).__name__}: {e}".splitlines()[0]
    _write_json(run_dir / STATUS_FILE, {
        "status": "failed", "config_hash": config_hash(spec.config), "error": err,
        "traceback": traceback.format_exc(),
    })
    say(f"{tag}: FAILED: {err}")
    return RunResult(spec.name, run_dir, dict(spec.overrides), "failed", {}, err)


def _finished(spec: RunSpec, run_dir: Path, returned: Mapping[str, Any] | None, t0: float,
              peak_reset: bool, tag: str, say: Callable[[str], None]) -> RunResult:
    """Record what a run returned (a stop signal ends the sweep, to be resumed)."""
    if returned is None:  # fall back to the trainer's summary.json
        returned = _read_status(run_dir / "summary.json")
    if "stopped" in returned:
        say(f"{tag}: stopped by {returned['stopped']} at step {returned.get('step')}")
        raise KeyboardInterrupt
    metrics = _scalar_metrics(returned)
    if "peak_rss_mb" in metrics and peak_reset and (peak := _peak_rss_mb()) is not None:
        metrics["peak_rss_mb"] = peak  # this run's (population's), not the whole sweep's
    metrics.setdefault("wall_s", round(time.perf_counter() - t0, 3))
    _write_json(run_dir / STATUS_FILE, {"status": "done", "config_hash": config_hash(spec.config),
                                        "metrics": metrics})
    say(f"{tag}: done " + ", ".join(f"{k}={format_value(v)}" for k, v in metrics.items()))
    return RunResult(spec.name, run_dir, dict(spec.overrides), "done", metrics)


def _run_one(
    spec: RunSpec, run_dir: Path, run_fn: RunFn, tag: str, say: Callable[[str], None]
) -> RunResult:
    """Run (or skip, when finished before) one run; its status file records the outcome."""
    prior = _prior(spec, run_dir, tag, say)
    if prior is not None:
        return prior
    _start(spec, run_dir, tag, say)
    t0, peak_reset = time.perf_counter(), _reset_peak_rss()
    try:
        returned = run_fn(spec.config, run_dir)
    except Exception as e:  # a failed run is recorded; the sweep goes on
        return _failed(spec, run_dir, e, tag, say)
    return _finished(spec, run_dir, returned, t0, peak_reset, tag, say)


def _run_population(runs: list[tuple[RunSpec, Path, str]], population: Any,
                    say: Callable[[str], None]) -> list[RunResult]:
    """Runs of one group as one population (`population.run`); each keeps its own record."""
    say(f"population of {len(runs)}: " + ", ".join(spec.name for spec, _, _ in runs))
    for spec, run_dir, tag in runs:
        _start(spec, run_dir, tag, say)
    t0, peak_reset = time.perf_counter(), _reset_peak_rss()
    try:
        returned = population.run([s.config for s, _, _ in runs], [d for _, d, _ in runs])
    except Exception as e:  # every member failed with it; the sweep goes on
        return [_failed(spec, run_dir, e, tag, say) for spec, run_dir, tag in runs]
    return [_finished(spec, run_dir, r, t0, peak_reset, tag, say)
            for (spec, run_dir, tag), r in zip(runs, returned, strict=True)]


def _run_all(specs: list[RunSpec], folder: Path, run_fn: RunFn, population: Any,
             size: int | None, say: Callable[[str], None]) -> Iterator[RunResult]:
    """Every run, one at a time or (with `population`) grouped into populations of at most
    `size` members (None: as many as the memory estimate allows) of runs that share a base."""
    tagged = [(spec, folder / spec.name, f"[{i + 1}/{len(specs)}] {spec.name}")
              for i, spec in enumerate(specs)]
    if population is None or size == 1:
        for spec, run_dir, tag in tagged:
            yield _run_one(spec, run_dir, run_fn, tag, say)
        return
    groups: dict[str, list[tuple[RunSpec, Path, str]]] = {}
    for spec, run_dir, tag in tagged:
        prior = _prior(spec, run_dir, tag, say)
        if prior is not None:
            yield prior
        else:
            key = (population.group_key(spec.config), _method_group(spec))
            groups.setdefault(key, []).append((spec, run_dir, tag))
    for members in groups.values():
        n = population.plan_size(members[0][0].config, size)
        for i in range(0, len(members), n):
            chunk = members[i:i + n]
            if len(chunk) == 1:
                yield _run_one(*chunk[0][:2], run_fn, chunk[0][2], say)
            else:
                yield from _run_population(chunk, population, say)


def _method_group(spec: RunSpec) -> str:
    """What the LoRA method adds to a run's population group: PiSSA and LoftQ runs change
    the base (each trains alone, under its own name), DoRA members share a population only
    with DoRA members of the same targets; other methods (rsLoRA, LoRA+, ...) mix freely."""
    lo = spec.config.lora
    if lo.init in ("pissa", "loftq"):
        return f"alone:{spec.name}"
    return f"dora:{lo.targets!r}:{lo.exclude!r}" if lo.method == "dora" else "lora"


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: ``/proc/self/clear_refs``).

    Runs of a sweep share the process, whose ``ru_maxrss`` only grows; after the reset,
    ``VmHWM`` is the peak of the run alone. False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float | None:
    """``VmHWM`` of ``/proc/self/status`` (MiB): the peak RSS since `_reset_peak_rss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
