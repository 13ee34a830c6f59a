"""Run configuration: a TOML file mapped onto the library's own typed, frozen specs.

A config file has one table per section and two top-level keys, ``name`` (the run name)
and ``output_dir``. The sections that describe a library concept *are* that concept's spec,
so there is nothing to copy field by field::

    [lora]   -> jaxlora.lora.LoraSpec        [quant] -> jaxlora.quant.QuantRules
    [data]   -> jaxlora.data.DataConfig      [optim] -> jaxlora.optim.OptimSpec
    [sharding] -> jaxlora.sharding.ShardingSpec

and the run-only sections (``[model]``, ``[train]``, ``[eval]``, ``[checkpoint]``) are
declared here. Every field's default, one-line doc and checks are its
dataclass field metadata (`jaxlora.schema.field`); :func:`describe` renders them all.

    cfg = load_config("experiments/qlora_smollm2.toml", overrides=["lora.rank=32"])
    (run_dir / "config.toml").write_text(dump_config(cfg))   # load_config of it == cfg

A config may start from another one: ``base = "other.toml"`` (relative to the file that
names it) loads that file first and lets this file's keys override it, section by section.

Mistakes fail early with :class:`~jaxlora.errors.ConfigError`, one line naming the file and
the full key path: unknown keys (with the closest valid name), wrong types, values out of
range. Overrides (``--set lora.rank=32``) are applied before validation; their values are
parsed as TOML literals and fall back to a plain string (``--set model.name=tiny-llama``).
The override API (:func:`read_raw`, :func:`override_items`, :func:`set_key`,
:func:`is_key`) is public so that sweeps build their runs the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxlora import schema
from jaxlora.data.spec import DataConfig
from jaxlora.errors import ConfigError
from jaxlora.lora.spec import LoraSpec
from jaxlora.optim.spec import OptimSpec
from jaxlora.quant.tree import QuantRules
from jaxlora.schema import FLOAT_DTYPES, field
from jaxlora.sharding.spec import ShardingSpec

__all__ = [
    "Config",
    "ModelSection",
    "TrainSection",
    "EvalSection",
    "CheckpointSection",
    "SECTIONS",
    "Overrides",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "read_raw",
    "parse_override",
    "override_items",
    "set_key",
    "is_key",
    "dump_config",
    "to_dict",
    "describe",
    "config_hash",
    "field_paths",
    "closest_key",
    "read_toml",
]

Overrides = Sequence[str] | Mapping[str, Any]
"""``["lora.rank=32", ...]`` (values parsed as TOML literals) or ``{"lora.rank": 32}``."""

# The remat policies of `jaxlora.models.common.REMAT_POLICIES` (a test keeps the two equal):
# named here because importing the models imports JAX, and a config is checked without it.
REMAT_POLICIES = ("none", "full", "attn", "dots")


# ----------------------------------------------------------------------------------------
# The run-only sections (the library's specs are imported above).


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which base model to load and how to run it."""

    name: str = field(
        "smollm2-135m-instruct",
        "Model name (smollm2-135m-instruct, gemma3-270m), or path to a GGUF file / HF "
        "folder; 'tiny-llama'/'tiny-qwen3'/'tiny-gemma3'/'tiny-gpt2' are random test models.",
    )
    param_dtype: str = field(
        "float32", "Dtype of base weights that stay unquantized (norms, embeddings).",
        choices=FLOAT_DTYPES,
    )
    compute_dtype: str = field(
        "auto", "Dtype of activations and matmuls in the forward pass; auto: bfloat16 on GPU "
        "and TPU, float32 on CPU (the loss and the optimizer are float32 always).",
        choices=("auto", *FLOAT_DTYPES),
    )
    remat: str = field(
        "none", "Rematerialization of each scanned block: none (keep all activations), full "
        "(recompute the block in the backward), attn (full, but keep keys, values and the "
        "residual after attention), dots (keep matmul outputs).",
        choices=REMAT_POLICIES,
    )


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The training loop."""

    steps: int = field(200, "Optimizer steps.", ge=1)
    grad_accum: int = field(1, "Micro-batches accumulated per optimizer step.", ge=1)
    seed: int = field(0, "Seed of adapter init and dropout.", ge=0)
    log_every: int = field(10, "Write metrics.jsonl and the progress line every N steps.", ge=1)
    progress: bool = field(True, "Show a progress bar with loss, lr and tokens/s.")
    tensorboard: bool = field(False, "Also write the metrics as TensorBoard event files in "
                                     "RUN_DIR/tensorboard (needs the tensorboard extra).")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Validation and sample generations."""

    every: int = field(50, "Evaluate validation loss every N steps (0 = only at the end).", ge=0)
    batches: int = field(20, "At most this many validation batches per evaluation.", ge=1)
    samples: tuple[str, ...] = field((), "Prompts answered with and without the adapter at the end.")
    chat: bool = field(False, "Wrap each sample prompt in the model's chat template (false: the "
                              "prompt is text to continue, like the training data).")
    max_new_tokens: int = field(64, "Tokens generated per sample prompt.", ge=1)
    temperature: float = field(0.0, "Sampling temperature of the samples (0 = greedy).", ge=0)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Adapter + optimizer checkpoints in the run directory."""

    every: int = field(100, "Save every N steps (0 = only at the end).", ge=0)
    keep: int = field(2, "Keep the latest N checkpoints.", ge=1)
    keep_best: bool = field(True, "Also keep the checkpoint with the lowest validation loss.")
    async_save: bool = field(True, "Write checkpoints in the background while training goes on.")
    resume: bool = field(True, "Resume from the latest checkpoint found in the run directory.")


@dataclasses.dataclass(frozen=True)
class Config:
    """A complete run description; `jaxlora train` needs nothing else."""

    name: str = field("run", "Run name (default: the config file's stem); the run directory is output_dir/name.")
    output_dir: str = field("runs", "Folder that holds run directories.")
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    quant: QuantRules = dataclasses.field(default_factory=QuantRules)
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimSpec = dataclasses.field(default_factory=OptimSpec)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    sharding: ShardingSpec = dataclasses.field(default_factory=ShardingSpec)

    @property
    def run_dir(self) -> Path:
        """``output_dir / name``."""
        return Path(self.output_dir) / self.name


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.default_factory is not dataclasses.MISSING
}
"""Section name -> the dataclass its TOML table maps onto."""
_TOP_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in SECTIONS}


def field_paths() -> list[str]:
    """Every valid dotted key: ``name``, ``output_dir``, ``model.name``, ..."""
    paths = list(_TOP_FIELDS)
    for sec, cls in SECTIONS.items():
        paths += [f"{sec}.{f}" for f in schema.config_fields(cls)]
    return paths


def _lookup(path: str) -> tuple[type, dataclasses.Field, Any] | None:
    """(owning class, field, type hint) of a dotted field path, or None."""
    parts = path.split(".")
    if len(parts) == 1 and parts[0] in _TOP_FIELDS:
        return Config, _TOP_FIELDS[parts[0]], schema.hints(Config)[parts[0]]
    if len(parts) == 2 and parts[0] in SECTIONS:
        cls = SECTIONS[parts[0]]
        fields = schema.config_fields(cls)
        if parts[1] in fields:
            return cls, fields[parts[1]], schema.hints(cls)[parts[1]]
    return None


def _table_field(path: str) -> str | None:
    """``lora.rank_pattern`` for ``lora.rank_pattern.q_proj`` (a key inside a table field)."""
    parts = path.split(".")
    head = ".".join(parts[:2])
    found = _lookup(head) if len(parts) > 2 else None
    return head if found is not None and schema.pair_value_type(found[2]) is not None else None


def is_key(path: str) -> bool:
    """Whether a dotted key names a config field, or a key inside a table-valued field
    (``lora.rank_pattern.q_proj``, ``sharding.mesh.data``)."""
    return _lookup(path) is not None or _table_field(path) is not None


def closest_key(path: str, candidates: Iterable[str] | None = None) -> str | None:
    """The valid key closest to a mistyped one (same leaf in another section counts)."""
    candidates = list(field_paths() if candidates is None else candidates)
    head, _, leaf = path.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == head}
    near = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if near:  # a typo inside the right section
        return siblings[near[0]]
    same_leaf = [c for c in candidates if c.rpartition(".")[2] == leaf]
    if same_leaf:  # the right name in the wrong section
        return same_leaf[0]
    best = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if best:
        return best[0]
    leaves = {c.rpartition(".")[2]: c for c in candidates}
    near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[near[0]] if near else None


def _unknown_key(src: str, path: str, candidates: Iterable[str] | None = None) -> ConfigError:
    hint = closest_key(path, candidates)
    suggestion = f"; did you mean '{hint}'?" if hint else ""
    return ConfigError(f"{src}: unknown key '{path}'{suggestion}")


# ----------------------------------------------------------------------------------------
# Reading: TOML -> raw dict (with `base` inheritance) -> overrides -> typed, validated Config.


def read_toml(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Child keys override base keys; section tables merge key by key (one level)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in child.items():
        if k in SECTIONS and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def read_raw(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The TOML of a config file with its ``base`` chain merged in, not yet validated.

    Pass the result (after :func:`set_key`) to :func:`config_from_dict`.
    """
    path = Path(path)
    raw = read_toml(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"{path}: base: circular inheritance {chain}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path string, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: base config file not found: {base_path}")
    return _merge(read_raw(base_path, (*_seen, resolved)), raw)


def parse_override(text: str) -> tuple[str, Any]:
    """``"lora.rank=32"`` -> ``("lora.rank", 32)``; the value is a TOML literal or a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. lora.rank=32")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def override_items(overrides: Overrides | None) -> list[tuple[str, Any]]:
    """Overrides in any accepted form as ``[(dotted key, value), ...]``, in order."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        overrides = [overrides]
    return [parse_override(o) if isinstance(o, str) else tuple(o) for o in overrides]


def set_key(raw: dict[str, Any], path: str, value: Any, src: str) -> None:
    """Set a dotted key in a raw (TOML-shaped) config dict, in place.

    ``path`` names a field (``lora.rank``) or a key inside a table-valued field
    (``lora.rank_pattern.q_proj``). The value is checked later, by :func:`config_from_dict`.

    Raises:
      ConfigError: ``src: unknown key '...'; did you mean '...'?``.
    """
    parts = path.split(".")
    table = _table_field(path)
    if _lookup(path) is None and table is None:
        raise _unknown_key(src, path)
    if len(parts) == 1:
        raw[path] = value
        return
    sec = raw.get(parts[0])
    sec = dict(sec) if isinstance(sec, dict) else {}
    if table is None:
        sec[parts[1]] = value
    else:  # e.g. lora.rank_pattern.q_proj=4: start from the table set so far, or the default
        current = sec.get(parts[1], dict(getattr(getattr(Config(), parts[0]), parts[1])))
        current = dict(current) if isinstance(current, dict) else {}
        current[".".join(parts[2:])] = value
        sec[parts[1]] = current
    raw[parts[0]] = sec


def _apply(raw: dict[str, Any], overrides: Overrides | None, src: str) -> None:
    """Set each override, checking its type and range so an error names the override."""
    for key, value in override_items(overrides):
        set_key(raw, key, value, f"{src} (override {key})")
        found = _lookup(key)
        if found is not None:
            where = f"{src}: override {key}"
            schema.check_value(schema.coerce(value, found[2], where), found[1], where)


def config_from_dict(raw: Mapping[str, Any], src: str = "<config>") -> Config:
    """Validate a raw (TOML-shaped) dict into a Config. ``src`` names it in error messages."""
    kwargs: dict[str, Any] = {}
    unknown = lambda where: _unknown_key(src, where)
    for key, value in raw.items():
        if key in SECTIONS:
            kwargs[key] = schema.build(SECTIONS[key], value, key, src, unknown)
        elif key in _TOP_FIELDS:
            value = schema.coerce(value, schema.hints(Config)[key], f"{src}: {key}")
            schema.check_value(value, _TOP_FIELDS[key], f"{src}: {key}")
            kwargs[key] = value
        else:
            raise _unknown_key(src, key, [*field_paths(), *SECTIONS])
    cfg = Config(**kwargs)
    _check_config(cfg, src)
    return cfg


def _check_config(cfg: Config, src: str) -> None:
    """Checks that involve more than one field."""
    if not cfg.name.strip() or cfg.name in (".", "..") or "\\" in cfg.name:
        raise ConfigError(f"{src}: name: {cfg.name!r} is not usable as a run directory name")
    if cfg.lora.init == "loftq" and cfg.quant.qtype == "none":
        raise ConfigError(
            f"{src}: lora.init: 'loftq' initializes a quantized base, but quant.qtype is 'none' "
            "(set quant.qtype, e.g. 'nf4', or choose another lora.init)"
        )
    decays = cfg.optim.schedule != "constant"  # a decay needs at least one step after warmup
    if cfg.optim.warmup_steps > cfg.train.steps - decays:
        raise ConfigError(
            f"{src}: optim.warmup_steps: {cfg.optim.warmup_steps} leaves no step for the "
            f"{cfg.optim.schedule} decay of train.steps ({cfg.train.steps}); it must be less"
            if decays else
            f"{src}: optim.warmup_steps: {cfg.optim.warmup_steps} is more than "
            f"train.steps ({cfg.train.steps})"
        )


def load_config(path: str | os.PathLike, overrides: Overrides | None = ()) -> Config:
    """Read, inherit (``base = ...``), override and validate a TOML config file.

    Args:
      path: the TOML file.
      overrides: ``["lora.rank=32", ...]`` (values parsed as TOML literals, else strings) or a
        mapping ``{"lora.rank": 32}``; applied after inheritance and before validation.
    Returns:
      The frozen Config. ``name`` defaults to the file's stem when no file sets it.
    Raises:
      ConfigError: one line with the file and the full key path of the first problem.
    """
    p = Path(path)
    raw = read_raw(p)
    raw.setdefault("name", p.stem)
    _apply(raw, overrides, str(p))
    return config_from_dict(raw, str(p))


def apply_overrides(cfg: Config, overrides: Overrides, src: str = "<overrides>") -> Config:
    """A new, validated Config with dotted-key overrides applied to ``cfg``."""
    raw = to_dict(cfg)
    _apply(raw, overrides, src)
    return config_from_dict(raw, src)


# ----------------------------------------------------------------------------------------
# Writing: Config -> dict / TOML / hash / reference table.


def _section_dict(spec: Any) -> dict[str, Any]:
    tps = schema.hints(type(spec))
    return {
        k: schema.plain(getattr(spec, k), f, tps[k])
        for k, f in schema.config_fields(type(spec)).items()
    }


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain TOML-shaped dict: sections are dicts, tuples lists, pair tuples tables."""
    out: dict[str, Any] = {k: getattr(cfg, k) for k in _TOP_FIELDS}  # strings
    for sec in SECTIONS:
        out[sec] = _section_dict(getattr(cfg, sec))
    return out


def dump_config(cfg: Config, *, comments: bool = True) -> str:
    """TOML text of every field of ``cfg``; ``load_config`` of it gives back ``cfg``."""
    data = to_dict(cfg)
    lines = ["# Resolved jaxlora config: every field, after base configs and overrides."]

    def emit(key: str, value: Any, f: dataclasses.Field) -> None:
        line = f"{schema.toml_key(key)} = {schema.toml_value(value)}"
        if comments:
            line += f"  # {f.metadata['doc']}"
        lines.append(line)

    for key, f in _TOP_FIELDS.items():
        emit(key, data[key], f)
    for sec, cls in SECTIONS.items():
        lines += ["", f"[{sec}]"]
        for key, f in schema.config_fields(cls).items():
            emit(key, data[sec][key], f)
    return "\n".join(lines) + "\n"


def config_hash(cfg: Config, *, ignore: Sequence[str] = ("name", "output_dir"), n: int = 10) -> str:
    """Short, stable hash of everything that changes a run's result (not its name or folder)."""
    data = to_dict(cfg)
    for key in ignore:
        data.pop(key, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def describe() -> str:
    """The config reference as Markdown: one table per section (key, type, default, doc)."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    def rows(cls: type, fields: Mapping[str, dataclasses.Field]) -> list[str]:
        out = []
        for key, f in fields.items():
            tp = schema.hints(cls)[key]
            value = schema.toml_value(schema.plain(f.default, f, tp))
            kind = schema.type_name(f, tp)
            out.append(f"| `{key}` | {cell(kind)} | `{cell(value)}` | {cell(f.metadata['doc'])} |")
        return out

    header = ["| key | type | default | description |", "|---|---|---|---|"]
    out = ["## Top level", "", *header, *rows(Config, _TOP_FIELDS)]
    out += ["", "A config may also set `base = \"other.toml\"` (relative to the file) to start "
            "from another config; its keys override the base's."]
    for sec, cls in SECTIONS.items():
        summary = cls.__doc__.strip().split("\n\n")[0].replace("\n", " ")
        out += ["", f"## [{sec}]", "", summary, "", *header, *rows(cls, schema.config_fields(cls))]
    return "\n".join(out) + "\n"
