"""Sweep files: a base config, the axes to vary, and the runs they expand to.

A sweep file names a base config and the axes to vary::

    base = "qlora_smollm2.toml"              # relative to this file
    population_size = 8                      # optional: members trained at once (1: alone)
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
folder. `jaxlora.sweep.run_sweep` skips runs that finished before, calls ``run_fn`` again on
unfinished or failed ones (the trainer resumes from its checkpoints), records failures and
goes on, and writes ``results.csv``, ``results.md`` and PNG plots (`jaxlora.sweep.results`).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxlora.config import (
    SECTIONS,
    Config,
    Overrides,
    closest_key,
    config_from_dict,
    is_key,
    override_items,
    read_raw,
    read_toml,
    set_key,
)
from jaxlora.errors import ConfigError
from jaxlora.sweep.results import format_value

__all__ = ["Sweep", "RunSpec", "load_sweep", "expand", "run_name", "sweep_dir"]


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
