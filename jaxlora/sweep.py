"""Hyperparameter sweeps: expansion, a resumable runner, a results table and plots.

A sweep file names a base config and the axes to vary::

    base = "qlora_smollm2.toml"              # relative to this file
    [set]                                    # overrides for every run
    "train.steps" = 100
    [grid]                                   # Cartesian product
    "lora.rank" = [1, 4, 16, 64, 256]
    "lora.scaling" = ["standard", "rslora"]
    [zip]                                    # lists walked together (equal lengths)
    "lora.rank" = [4, 16]
    "lora.alpha" = [8.0, 32.0]
    [random]                                 # n samples, seeded
    n = 8
    seed = 0
    "optim.lr" = { low = 1e-5, high = 1e-3, log = true }
    "lora.dropout" = [0.0, 0.05, 0.1]

The runs are the product of the grid points, the zip rows and the random samples (an absent
kind contributes one empty point). Each run gets a readable, deterministic name built from
its swept values (``rank-16_scaling-rslora``) and its own directory under the sweep's output
folder. :func:`run_sweep` skips runs that finished before, calls ``run_fn`` again on
unfinished or failed ones (the trainer resumes from its checkpoints), records failures and
goes on, and writes ``results.csv``, ``results.md`` and PNG plots (`jaxlora.sweep_results`).

Big_vision declares sweeps next to configs in the same spirit; the file format here is ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import random
import re
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxlora.config import (
    SECTIONS,
    Config,
    Overrides,
    closest_key,
    config_from_dict,
    config_hash,
    dump_config,
    is_key,
    override_items,
    read_raw,
    read_toml,
    set_key,
)
from jaxlora.errors import ConfigError
from jaxlora.sweep_results import RunResult, format_value, plot_results, write_results

__all__ = [
    "Sweep",
    "RunSpec",
    "RunResult",
    "SweepResult",
    "RunFn",
    "load_sweep",
    "expand",
    "run_name",
    "run_sweep",
    "write_results",
    "sweep_dir",
    "plot_results",
    "STATUS_FILE",
]

RunFn = Callable[[Config, Path], Mapping[str, Any] | None]
STATUS_FILE = "sweep_status.json"  # written by the runner into each run directory


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed sweep file. Axis values are tuples; keys are dotted config paths."""

    path: Path
    name: str
    base: Path
    output_dir: str | None
    set: tuple[tuple[str, Any], ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    zip: tuple[tuple[str, tuple[Any, ...]], ...]
    random: tuple[tuple[str, Any], ...]
    random_n: int
    random_seed: int
    population_size: int | None = None  # members per population; None = from memory

    @property
    def axes(self) -> list[str]:
        """The swept keys, in file order (grid, zip, random)."""
        return [k for k, _ in (*self.grid, *self.zip, *self.random)]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its name, the swept values, and the full validated config."""

    name: str
    overrides: tuple[tuple[str, Any], ...]
    config: Config


@dataclasses.dataclass
class SweepResult:
    out_dir: Path
    runs: list[RunResult]
    csv_path: Path
    md_path: Path
    plots: list[Path]


# ----------------------------------------------------------------------------------------
# Parsing and expansion.


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"lora": {"rank": [..]}}`` and ``{"lora.rank": [..]}`` both give ``[("lora.rank", [..])]``.

    Descends only through section names, so a table-valued field stays one value.
    """
    out = []
    for key, value in table.items():
        path = f"{prefix}{key}"
        if path in SECTIONS and isinstance(value, dict):
            out += _flatten(value, f"{path}.")
        else:
            out.append((path, value))
    return out


def _check_key(src: str, where: str, key: str) -> None:
    """A swept or set key must name a config field (or a key inside a table-valued field)."""
    if is_key(key):
        return
    hint = closest_key(key)
    suggestion = f"; did you mean '{hint}'?" if hint else ""
    raise ConfigError(f"{src}: {where}.{key}: unknown config key '{key}'{suggestion}")


def _axis(src: str, where: str, key: str, values: Any) -> tuple[str, tuple[Any, ...]]:
    _check_key(src, where, key)
    if not isinstance(values, list):
        raise ConfigError(f"{src}: {where}.{key}: expected a list of values, got {values!r}")
    if not values:
        raise ConfigError(f"{src}: {where}.{key}: empty axis (give at least one value)")
    return key, tuple(values)


def _random_axis(src: str, key: str, spec: Any) -> tuple[str, Any]:
    where = f"random.{key}"
    _check_key(src, "random", key)
    if isinstance(spec, list):
        return _axis(src, "random", key, spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"{src}: {where}: expected a list or {{low, high, log}}, got {spec!r}")
    extra = set(spec) - {"low", "high", "log"}
    if extra or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{src}: {where}: a range needs exactly low, high and optional log")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{src}: {where}: low and high must be numbers")
    if not isinstance(log, bool):
        raise ConfigError(f"{src}: {where}.log: expected true or false")
    if not low <= high:
        raise ConfigError(f"{src}: {where}: low ({low}) is greater than high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{src}: {where}: a log range needs low > 0")
    return key, {"low": low, "high": high, "log": log}


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep file (keys exist, axes non-empty, zip lengths equal)."""
    p = Path(path)
    raw = read_toml(p, "sweep")
    src = str(p)
    allowed = {"base", "name", "output_dir", "population_size", "set", "grid", "zip", "random"}
    for key in raw:
        if key not in allowed:
            closest = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean '{closest[0]}'?" if closest else ""
            raise ConfigError(f"{src}: unknown sweep key '{key}'{hint}")
    if "base" not in raw or not isinstance(raw["base"], str):
        raise ConfigError(f"{src}: base: a sweep needs base = \"path/to/config.toml\"")
    base = p.parent / raw["base"]
    if not base.is_file():
        raise ConfigError(f"{src}: base: base config file not found: {base}")
    for key in ("set", "grid", "zip", "random"):
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{src}: {key}: expected a table [{key}]")
        if key in raw and key != "set" and not raw[key]:  # would run the base alone, silently
            raise ConfigError(f"{src}: [{key}]: no keys to sweep (give key = [values, ...])")

    sets = []
    for key, value in _flatten(raw.get("set", {})):
        _check_key(src, "set", key)
        sets.append((key, value))
    grid = [_axis(src, "grid", k, v) for k, v in _flatten(raw.get("grid", {}))]
    zipped = [_axis(src, "zip", k, v) for k, v in _flatten(raw.get("zip", {}))]
    lengths = {k: len(v) for k, v in zipped}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise ConfigError(f"{src}: zip: lists must have equal lengths ({detail})")

    rnd_table = dict(raw.get("random", {}))
    n = rnd_table.pop("n", None)
    seed = rnd_table.pop("seed", 0)
    rnd = [_random_axis(src, k, v) for k, v in _flatten(rnd_table)]
    if rnd and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"{src}: random.n: expected the number of samples (>= 1), got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{src}: random.seed: expected an integer, got {seed!r}")

    seen: dict[str, str] = {k: "set" for k, _ in sets}
    for kind, axes in (("grid", grid), ("zip", zipped), ("random", rnd)):
        for k, _ in axes:
            if k in seen:
                raise ConfigError(f"{src}: {kind}.{k}: key is also in [{seen[k]}]")
            seen[k] = kind

    name = raw.get("name", p.stem)
    out = raw.get("output_dir")
    if not isinstance(name, str) or not name or not isinstance(out, (str, type(None))):
        raise ConfigError(f"{src}: name/output_dir: expected strings")
    size = raw.get("population_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ConfigError(f"{src}: population_size: expected a number of members >= 1, got {size!r}")
    return Sweep(
        path=p, name=name, base=base, output_dir=out, set=tuple(sets), grid=tuple(grid),
        zip=tuple(zipped), random=tuple(rnd), random_n=n if rnd else 0, random_seed=seed,
        population_size=size,
    )


def _points(sweep: Sweep) -> list[list[tuple[str, Any]]]:
    grid_pts: list[list[tuple[str, Any]]] = [
        list(zip([k for k, _ in sweep.grid], combo, strict=True))
        for combo in itertools.product(*(v for _, v in sweep.grid))
    ]
    zip_pts: list[list[tuple[str, Any]]] = [[]]
    if sweep.zip:
        keys = [k for k, _ in sweep.zip]
        zip_pts = [list(zip(keys, row, strict=True)) for row in zip(*(v for _, v in sweep.zip), strict=True)]
    rnd_pts: list[list[tuple[str, Any]]] = [[]]
    if sweep.random:
        rng = random.Random(sweep.random_seed)
        rnd_pts = []
        for _ in range(sweep.random_n):
            point = []
            for key, spec in sweep.random:
                if isinstance(spec, tuple):
                    point.append((key, rng.choice(spec)))
                    continue
                low, high, log = spec["low"], spec["high"], spec["log"]
                u = rng.random()
                value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if log else low + u * (high - low)
                if isinstance(low, int) and isinstance(high, int):
                    value = min(high, max(low, round(value)))
                else:
                    value = float(f"{value:.4g}")  # readable names, stable across platforms
                point.append((key, value))
            rnd_pts.append(point)
    return [g + z + r for g in grid_pts for z in zip_pts for r in rnd_pts]


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


def run_name(overrides: Sequence[tuple[str, Any]], *, max_len: int = 80) -> str:
    """``[("lora.rank", 16), ("lora.scaling", "rslora")]`` -> ``"rank-16_scaling-rslora"``.

    Keys are shortened to their last part unless two swept keys share it; characters other
    than letters, digits and ``.-`` become ``-`` (safe in every shell and checkpoint path);
    over-long names end in a short hash.
    """
    if not overrides:
        return "base"
    leaves = [k.rsplit(".", 1)[-1] for k, _ in overrides]
    parts = []
    for (key, value), leaf in zip(overrides, leaves, strict=True):
        label = leaf if leaves.count(leaf) == 1 else key
        text = format_value(value).replace("e+", "e")  # 1e+30 -> 1e30, never read as 1e-30
        parts.append(re.sub(r"[^A-Za-z0-9.-]+", "-", f"{label}-{text}"))
    name = "_".join(parts).strip("-.") or "run"
    if len(name) > max_len:
        name = f"{name[: max_len - 7]}-{_short_hash(list(overrides))}"
    return name


def expand(
    sweep: Sweep | str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    overrides: Overrides | None = (),
) -> list[RunSpec]:
    """Every run of a sweep, each with its validated Config.

    ``overrides`` (``["train.steps=5"]`` or a mapping, e.g. from ``--set``) apply to every run
    after the sweep's ``[set]`` and before the swept values.

    The config's ``output_dir`` is the sweep's folder and its ``name`` the run name, so
    ``spec.config.run_dir`` is the run's directory. A value that is invalid for its key fails
    here, with the key path, before anything runs.
    """
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    folder = str(sweep_dir(sweep, out_dir))
    base_raw = read_raw(sweep.base)
    base_raw.setdefault("name", sweep.base.stem)
    for key, value in sweep.set:
        set_key(base_raw, key, value, f"{sweep.path} (set.{key})")
    for key, value in override_items(overrides):
        if key in sweep.axes:
            raise ConfigError(f"{sweep.path}: override {key}: the sweep varies this key")
        set_key(base_raw, key, value, f"{sweep.path} (override {key})")

    specs: list[RunSpec] = []
    names: dict[str, int] = {}
    for point in _points(sweep):
        name = run_name(point)
        if name in names:  # e.g. two random samples that print alike
            name = f"{name}-{_short_hash(point)}"
        names[name] = 1
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base_raw.items()}
        for key, value in point:
            set_key(raw, key, value, f"{sweep.path} ({key}={format_value(value)})")
        raw["name"], raw["output_dir"] = name, folder
        cfg = config_from_dict(raw, f"{sweep.path} (run {name})")
        specs.append(RunSpec(name=name, overrides=tuple(point), config=cfg))
    return specs


def sweep_dir(sweep: Sweep, out_dir: str | os.PathLike | None = None) -> Path:
    """``out_dir``, else the sweep's ``output_dir``, else ``<base config output_dir>/<sweep name>``."""
    if out_dir is not None:
        return Path(out_dir)
    if sweep.output_dir is not None:
        return Path(sweep.output_dir)
    base_out = read_raw(sweep.base).get("output_dir", "runs")
    for key, value in sweep.set:
        if key == "output_dir":
            base_out = value
    return Path(str(base_out)) / sweep.name


# ----------------------------------------------------------------------------------------
# Running.


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


def _prior(spec: RunSpec, run_dir: Path, tag: str, say: Callable[[str], None]
           ) -> RunResult | None:
    """The recorded result of a run that needs no running (done before, or a folder of
    another config), else None."""
    prior = _read_status(run_dir / STATUS_FILE)
    digest = config_hash(spec.config)
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
            groups.setdefault(population.group_key(spec.config), []).append((spec, run_dir, tag))
    for members in groups.values():
        n = population.plan_size(members[0][0].config, size)
        for i in range(0, len(members), n):
            chunk = members[i:i + n]
            if len(chunk) == 1:
                yield _run_one(*chunk[0][:2], run_fn, chunk[0][2], say)
            else:
                yield from _run_population(chunk, population, say)


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
