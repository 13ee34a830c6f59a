"""Run configuration: a TOML file mapped onto typed, frozen dataclasses.

A config file has one table per section (``[model]``, ``[quant]``, ``[lora]``, ``[data]``,
``[optim]``, ``[train]``, ``[eval]``, ``[checkpoint]``, ``[sharding]``) and two top-level keys,
``name`` (the run name) and ``output_dir``. Every field has a default and a one-line doc
(``dataclasses.field(metadata={"doc": ...})``); :func:`describe` renders them all.

    cfg = load_config("experiments/qlora_smollm2.toml", overrides=["lora.rank=32"])
    (run_dir / "config.toml").write_text(dump_config(cfg))   # load_config of it == cfg

A config may start from another one: ``base = "other.toml"`` (relative to the file that
names it) loads that file first and lets this file's keys override it, section by section.

Mistakes fail early with :class:`~jaxlora.errors.ConfigError`, one line naming the file and
the full key path: unknown keys (with the closest valid name), wrong types, values out of
range. Overrides (``--set lora.rank=32``) are applied before validation; their values are
parsed as TOML literals and fall back to a plain string (``--set model.name=tiny-llama``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxlora.errors import ConfigError

__all__ = [
    "Config",
    "ModelSection",
    "QuantSection",
    "LoraSection",
    "DataSection",
    "OptimSection",
    "TrainSection",
    "EvalSection",
    "CheckpointSection",
    "ShardingSection",
    "SECTIONS",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "dump_config",
    "to_dict",
    "describe",
    "config_hash",
    "field_paths",
    "closest_key",
    "read_toml",
]

Overrides = Sequence[str] | Mapping[str, Any]

_QTYPES = ("nf4", "fp4", "int4", "int8", "none")
_FLOAT_DTYPES = ("float32", "bfloat16")


def _field(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with a one-line ``doc`` and declarative checks.

    Checks: ``choices`` (tuple of allowed values), ``ge``/``gt``/``le``/``lt`` (numeric bounds),
    ``check`` (a function returning an error string or None), ``regex`` (strings are regexes).
    """
    return dataclasses.field(default=default, metadata={"doc": doc, **checks})


def _power_of_two_block(v: int) -> str | None:
    if v < 32 or v > 4096 or v & (v - 1):
        return f"must be a power of two in 32..4096, got {v}"
    return None


def _mesh_check(mesh: tuple[tuple[str, int], ...]) -> str | None:
    if not mesh:
        return "needs at least one axis, e.g. {data = -1}"
    for axis, size in mesh:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", axis):
            return f"axis name {axis!r} is not an identifier"
        if size != -1 and size < 1:
            return f"axis {axis!r} has size {size}; sizes are >= 1, or -1 for 'the rest'"
    if sum(size == -1 for _, size in mesh) > 1:
        return "at most one axis may have size -1"
    return None


def _targets_check(value: str | tuple[str, ...]) -> str | None:
    if isinstance(value, tuple) and "all-linear" in value:
        return "write 'all-linear' as a string, not inside a list (a list holds module names)"
    return None


def _positive_pairs(pairs: tuple[tuple[str, Any], ...]) -> str | None:
    for key, value in pairs:
        if value <= 0:
            return f"value for {key!r} must be > 0, got {value}"
    return None


# ----------------------------------------------------------------------------------------
# Sections. Field comments live in the docs (metadata) so `describe()` can list them.


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which base model to load and how to run it."""

    name: str = _field(
        "smollm2-135m-instruct",
        "Model name, or path to a GGUF file / HF folder; 'tiny-llama'/'tiny-gpt2' are random test models.",
    )
    param_dtype: str = _field(
        "float32", "Dtype of base weights that stay unquantized (norms, embeddings).",
        choices=_FLOAT_DTYPES,
    )
    compute_dtype: str = _field(
        "float32", "Dtype of activations and matmuls in the forward pass.", choices=_FLOAT_DTYPES
    )
    remat: str = _field(
        "none", "Rematerialization of each scanned block: none (keep all activations), full "
        "(recompute the block in the backward), attn (full, but keep keys, values and the "
        "residual after attention), dots (keep matmul outputs).",
        choices=("none", "full", "attn", "dots"),  # models.common.REMAT_POLICIES (jax-free here)
    )


@dataclasses.dataclass(frozen=True)
class QuantSection:
    """How the frozen base weights are quantized on load (QLoRA)."""

    qtype: str = _field(
        "nf4", "Quantization of base weights: nf4, fp4, int4, int8, or none (keep float).",
        choices=_QTYPES,
    )
    block_size: int = _field(
        64, "Elements per quantization block (one absmax scale each); power of two in 32..4096.",
        check=_power_of_two_block,
    )
    double_quant: bool = _field(
        True, "Quantize the per-block absmax scales to 8 bits as well (QLoRA double quantization)."
    )
    include: str = _field(
        r"(^|/)kernel$", "Regex (re.search) over parameter paths of the leaves to quantize.",
        regex=True,
    )
    exclude: str = _field(
        r"(^|/)(embed|embedding|wte|wpe|lm_head)(/|$)|norm|(^|/)ln_|(^|/)bias$|scale$",
        "Regex over parameter paths kept in float even if included (embeddings, head, norms).",
        regex=True,
    )


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """The low-rank adapters: y = x W + scale * dropout(x) A B."""

    rank: int = _field(8, "Adapter rank r (default for every target).", ge=1)
    alpha: float = _field(
        16.0, "Scale numerator: scale = alpha/r (standard) or alpha/sqrt(r) (rslora).", gt=0
    )
    scaling: str = _field(
        "standard", "standard: alpha/r (Hu et al. 2021); rslora: alpha/sqrt(r) (Kalajdzievski 2023).",
        choices=("standard", "rslora"),
    )
    dropout: float = _field(0.0, "Dropout on the adapter input during training, in [0, 1).", ge=0, lt=1)
    targets: str | tuple[str, ...] = _field(
        "all-linear",
        "'all-linear', a list of module names (['q_proj', 'v_proj']) or one regex string over parameter paths.",
        regex=True, check=_targets_check,
    )
    exclude: str | tuple[str, ...] = _field(
        (), "Same forms as targets; matching leaves are not adapted (empty = none).", regex=True
    )
    init: str = _field(
        "kaiming", "Init of A (B starts at zero): kaiming, gaussian; pissa uses the base's SVD.",
        choices=("kaiming", "gaussian", "pissa"),
    )
    rank_pattern: tuple[tuple[str, int], ...] = _field(
        (), "Table regex -> rank overriding `rank` for matching paths (first match wins).",
        regex=True, check=_positive_pairs,
    )
    alpha_pattern: tuple[tuple[str, float], ...] = _field(
        (), "Table regex -> alpha overriding `alpha` for matching paths (first match wins).",
        regex=True, check=_positive_pairs,
    )
    dtype: str = _field("float32", "Dtype of the adapter parameters A and B.", choices=_FLOAT_DTYPES)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training and validation corpora, packed into fixed-length batches."""

    sources: tuple[str, ...] = _field(
        (), "Training data: files, folders, globs or 'stdlib:<glob>'; .jsonl holds text, prompt/completion or chat records."
    )
    validation_sources: tuple[str, ...] = _field(
        (), "Held-out data; when empty, `validation_fraction` of the documents is held out."
    )
    validation_fraction: float = _field(
        0.05, "Fraction of documents held out for validation when no validation_sources.", ge=0, lt=1
    )
    seq_len: int = _field(256, "Tokens per packed training sequence.", ge=2)
    batch_size: int = _field(8, "Sequences per micro-batch (one jitted step).", ge=1)
    seed: int = _field(0, "Seed of the document shuffle and the train/validation split.", ge=0)
    shuffle: bool = _field(True, "Shuffle documents each epoch (deterministic in `seed`).")
    max_documents: int = _field(0, "Use only the first N documents in sorted file order (0 = all).", ge=0)
    pack: bool = _field(True, "Concatenate documents into full rows (false: one document per row).")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """The optimizer of the adapters (the base never gets optimizer state)."""

    name: str = _field("adamw", "Optimizer: adamw, adam, or sgd (with momentum b1).",
                       choices=("adamw", "adam", "sgd"))
    lr: float = _field(2e-4, "Peak learning rate.", gt=0)
    schedule: str = _field(
        "cosine", "Learning-rate decay after warmup: constant, linear, or cosine.",
        choices=("constant", "linear", "cosine"),
    )
    warmup_steps: int = _field(0, "Linear warmup steps from 0 to `lr` (<= train.steps).", ge=0)
    min_lr_ratio: float = _field(
        0.0, "Final learning rate as a fraction of `lr` for linear/cosine decay.", ge=0, le=1
    )
    weight_decay: float = _field(0.0, "Decoupled weight decay on the adapters (adamw).", ge=0)
    max_grad_norm: float = _field(1.0, "Clip the global gradient norm to this (0 = no clipping).", ge=0)
    b1: float = _field(0.9, "Adam beta1 / SGD momentum.", ge=0, lt=1)
    b2: float = _field(0.999, "Adam beta2.", ge=0, lt=1)
    eps: float = _field(1e-8, "Adam epsilon.", gt=0)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The training loop."""

    steps: int = _field(200, "Optimizer steps.", ge=1)
    grad_accum: int = _field(1, "Micro-batches accumulated per optimizer step.", ge=1)
    seed: int = _field(0, "Seed of adapter init and dropout.", ge=0)
    log_every: int = _field(10, "Write metrics.jsonl and the progress line every N steps.", ge=1)
    progress: bool = _field(True, "Show a progress bar with loss, lr and tokens/s.")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Validation and sample generations."""

    every: int = _field(50, "Evaluate validation loss every N steps (0 = only at the end).", ge=0)
    batches: int = _field(20, "At most this many validation batches per evaluation.", ge=1)
    samples: tuple[str, ...] = _field((), "Prompts answered with and without the adapter at the end.")
    max_new_tokens: int = _field(64, "Tokens generated per sample prompt.", ge=1)
    temperature: float = _field(0.0, "Sampling temperature of the samples (0 = greedy).", ge=0)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Adapter + optimizer checkpoints in the run directory."""

    every: int = _field(100, "Save every N steps (0 = only at the end).", ge=0)
    keep: int = _field(2, "Keep the latest N checkpoints.", ge=1)
    keep_best: bool = _field(True, "Also keep the checkpoint with the lowest validation loss.")
    async_save: bool = _field(True, "Write checkpoints in the background while training goes on.")
    resume: bool = _field(True, "Resume from the latest checkpoint found in the run directory.")


@dataclasses.dataclass(frozen=True)
class ShardingSection:
    """Device mesh and how parameters and batches are laid out on it."""

    mesh: tuple[tuple[str, int], ...] = _field(
        (("data", -1),), "Table axis name -> size; -1 takes the remaining devices.",
        check=_mesh_check,
    )
    strategy: str = _field(
        "data", "data: replicate params, split batch; fsdp: also shard params; tensor: shard matmuls.",
        choices=("data", "fsdp", "tensor"),
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """A complete run description; `jaxlora train` needs nothing else."""

    name: str = _field("run", "Run name (default: the config file's stem); the run directory is output_dir/name.")
    output_dir: str = _field("runs", "Folder that holds run directories.")
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    quant: QuantSection = dataclasses.field(default_factory=QuantSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    sharding: ShardingSection = dataclasses.field(default_factory=ShardingSection)

    @property
    def run_dir(self) -> Path:
        """``output_dir / name``."""
        return Path(self.output_dir) / self.name


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.default_factory is not dataclasses.MISSING
}
_TOP_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in SECTIONS}


def _fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


_HINTS: dict[type, dict[str, Any]] = {
    cls: typing.get_type_hints(cls) for cls in (Config, *SECTIONS.values())
}


def field_paths() -> list[str]:
    """Every valid dotted key: ``name``, ``output_dir``, ``model.name``, ..."""
    paths = list(_TOP_FIELDS)
    for sec, cls in SECTIONS.items():
        paths += [f"{sec}.{f}" for f in _fields_of(cls)]
    return paths


def _lookup(path: str) -> tuple[type, dataclasses.Field, Any] | None:
    """(owning class, field, type hint) of a dotted field path, or None."""
    parts = path.split(".")
    if len(parts) == 1 and parts[0] in _TOP_FIELDS:
        return Config, _TOP_FIELDS[parts[0]], _HINTS[Config][parts[0]]
    if len(parts) == 2 and parts[0] in SECTIONS:
        cls = SECTIONS[parts[0]]
        fields = _fields_of(cls)
        if parts[1] in fields:
            return cls, fields[parts[1]], _HINTS[cls][parts[1]]
    return None


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


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Child keys override base keys; section tables merge key by key (one level)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in child.items():
        if k in SECTIONS and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    raw = read_toml(path)
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: base: circular inheritance {chain}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path string, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: base config file not found: {base_path}")
    return _merge(_read_with_bases(base_path, (*seen, resolved)), raw)


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


def _normalize_overrides(overrides: Overrides | None) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        overrides = [overrides]
    return [parse_override(o) if isinstance(o, str) else tuple(o) for o in overrides]


def _set_path(raw: dict[str, Any], path: str, value: Any, src: str) -> None:
    """Set a dotted key in a raw config dict, checking that it names a field."""
    parts = path.split(".")
    if _lookup(path) is not None:
        if len(parts) == 1:
            raw[path] = value
        else:
            sec = raw.get(parts[0])
            sec = dict(sec) if isinstance(sec, dict) else {}
            sec[parts[1]] = value
            raw[parts[0]] = sec
        return
    # A key inside a table-valued field, e.g. lora.rank_pattern.q_proj=4 or sharding.mesh.data=2.
    if len(parts) > 2:
        head = ".".join(parts[:2])
        found = _lookup(head)
        if found is not None and _pair_value_type(found[2]) is not None:
            sec = dict(raw.get(parts[0]) or {})
            current = sec.get(parts[1], dict(getattr(getattr(Config(), parts[0]), parts[1])))
            table = dict(current) if isinstance(current, dict) else {}
            table[".".join(parts[2:])] = value
            sec[parts[1]] = table
            raw[parts[0]] = sec
            return
    raise _unknown_key(src, path)


def _check_override(path: str, value: Any, where: str) -> None:
    """Type and range of one overridden field, so an error names the override, not the file."""
    found = _lookup(path)
    if found is not None:
        _check_value(_coerce(value, found[2], where), found[1], where)


def _pair_value_type(tp: Any) -> type | None:
    """For ``tuple[tuple[str, X], ...]`` return X, else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is tuple:
            inner = typing.get_args(args[0])
            if len(inner) == 2 and inner[0] is str:
                return inner[1]
    return None


def _is_str_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, Ellipsis)


def _is_str_or_tuple(tp: Any) -> bool:
    """``str | tuple[str, ...]``: one string (e.g. a regex) or a list of names."""
    args = typing.get_args(tp)
    return len(args) == 2 and args[0] is str and _is_str_tuple(args[1])


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _coerce_scalar(value: Any, tp: type, where: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{where}: expected {_TYPE_NAMES[tp]}, got {type(value).__name__} {value!r}")

    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported config field type {tp}")  # a bug in this module


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if _is_str_or_tuple(tp):
        if isinstance(value, str):
            return value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{where}: expected a string or a list of strings, got {type(value).__name__} {value!r}"
            )
        return tuple(_coerce_scalar(v, str, f"{where}[{i}]") for i, v in enumerate(value))
    if _is_str_tuple(tp):
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{where}: expected a list of strings, got {type(value).__name__} {value!r}"
            )
        return tuple(_coerce_scalar(v, str, f"{where}[{i}]") for i, v in enumerate(value))
    vt = _pair_value_type(tp)
    if vt is not None:
        if isinstance(value, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in value
        ):
            value = dict(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return tuple((str(k), _coerce_scalar(v, vt, f"{where}.{k}")) for k, v in value.items())
    return _coerce_scalar(value, tp, where)


def _check_value(value: Any, f: dataclasses.Field, where: str) -> None:
    md = f.metadata
    if md.get("choices") is not None and value not in md["choices"]:
        options = ", ".join(repr(c) for c in md["choices"])
        hint = difflib.get_close_matches(str(value), [str(c) for c in md["choices"]], n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{where}: {value!r} is not one of {options}{extra}")
    for op, ok, word in (
        ("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"),
    ):
        if op in md and not (isinstance(value, (int, float)) and ok(value, md[op])):
            raise ConfigError(f"{where}: must be {word} {md[op]}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    if md.get("regex"):
        if isinstance(value, str):  # one regex ("all-linear" is a keyword, and a valid regex)
            patterns = [value]
        elif value and isinstance(value[0], tuple):  # regex -> value table
            patterns = [k for k, _ in value]
        else:  # a list of strings: module names for lora targets, regexes elsewhere
            patterns = list(value)
        for pat in patterns:
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"{where}: invalid regex {pat!r}: {e}") from None
    if md.get("check") is not None:
        err = md["check"](value)
        if err:
            raise ConfigError(f"{where}: {err}")


def _build_section(cls: type, raw: Any, path: str, src: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {path}: expected a table [{path}], got {type(raw).__name__}")
    fields = _fields_of(cls)
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}"
        if key not in fields:
            raise _unknown_key(src, where)
        value = _coerce(value, _HINTS[cls][key], f"{src}: {where}")
        _check_value(value, fields[key], f"{src}: {where}")
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(raw: Mapping[str, Any], src: str = "<config>") -> Config:
    """Validate a raw (TOML-shaped) dict into a Config. ``src`` names it in error messages."""
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, key, src)
        elif key in _TOP_FIELDS:
            value = _coerce(value, _HINTS[Config][key], f"{src}: {key}")
            _check_value(value, _TOP_FIELDS[key], f"{src}: {key}")
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
    if cfg.optim.warmup_steps > cfg.train.steps:
        raise ConfigError(
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
    raw = _read_with_bases(p)
    raw.setdefault("name", p.stem)
    for key, value in _normalize_overrides(overrides):
        _set_path(raw, key, value, f"{p} (override {key})")
        _check_override(key, value, f"{p}: override {key}")
    return config_from_dict(raw, str(p))


def apply_overrides(cfg: Config, overrides: Overrides, src: str = "<overrides>") -> Config:
    """A new, validated Config with dotted-key overrides applied to ``cfg``."""
    raw = to_dict(cfg)
    for key, value in _normalize_overrides(overrides):
        _set_path(raw, key, value, f"{src} ({key})")
        _check_override(key, value, f"{src}: override {key}")
    return config_from_dict(raw, src)


# ----------------------------------------------------------------------------------------
# Writing: Config -> dict / TOML / hash / reference table.


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain TOML-shaped dict: sections are dicts, tuples lists, pair tuples tables."""

    def plain(obj: Any, tp: Any) -> Any:
        if _pair_value_type(tp) is not None:
            return {k: v for k, v in obj}
        if _is_str_tuple(tp) or (_is_str_or_tuple(tp) and isinstance(obj, tuple)):
            return list(obj)
        return obj

    out: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name in SECTIONS:
            hints = _HINTS[SECTIONS[f.name]]
            out[f.name] = {
                sf.name: plain(getattr(value, sf.name), hints[sf.name])
                for sf in dataclasses.fields(value)
            }
        else:
            out[f.name] = plain(value, _HINTS[Config][f.name])
    return out


def _toml_str(s: str) -> str:
    # JSON string escapes (\" \\ \n \t \uXXXX) are valid TOML basic-string escapes;
    # TOML also forbids a raw DEL.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007F")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dump_config(cfg: Config, *, comments: bool = True) -> str:
    """TOML text of every field of ``cfg``; ``load_config`` of it gives back ``cfg``."""
    data = to_dict(cfg)
    lines = ["# Resolved jaxlora config: every field, after base configs and overrides."]

    def emit(key: str, value: Any, f: dataclasses.Field) -> None:
        line = f"{_toml_key(key)} = {_toml_value(value)}"
        if comments:
            line += f"  # {f.metadata['doc']}"
        lines.append(line)

    for key, f in _TOP_FIELDS.items():
        emit(key, data[key], f)
    for sec, cls in SECTIONS.items():
        lines += ["", f"[{sec}]"]
        for key, f in _fields_of(cls).items():
            emit(key, data[sec][key], f)
    return "\n".join(lines) + "\n"


def config_hash(cfg: Config, *, ignore: Sequence[str] = ("name", "output_dir"), n: int = 10) -> str:
    """Short, stable hash of everything that changes a run's result (not its name or folder)."""
    data = to_dict(cfg)
    for key in ignore:
        data.pop(key, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def _type_name(tp: Any) -> str:
    if _is_str_tuple(tp):
        return "list of str"
    if _is_str_or_tuple(tp):
        return "str or list of str"
    vt = _pair_value_type(tp)
    if vt is not None:
        return f"table str → {vt.__name__}"
    return tp.__name__


def describe() -> str:
    """The config reference as Markdown: one table per section (key, type, default, doc)."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    def row(key: str, f: dataclasses.Field, tp: Any) -> str:
        kind = _type_name(tp)
        if f.metadata.get("choices"):
            kind = " | ".join(f'"{c}"' for c in f.metadata["choices"])
        value = f.default if f.default is not dataclasses.MISSING else None
        if _pair_value_type(tp) is not None:
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        return f"| `{key}` | {cell(kind)} | `{cell(_toml_value(value))}` | {cell(f.metadata['doc'])} |"

    header = ["| key | type | default | description |", "|---|---|---|---|"]
    out = ["## Top level", "", *header]
    out += [row(k, f, _HINTS[Config][k]) for k, f in _TOP_FIELDS.items()]
    out += ["", "A config may also set `base = \"other.toml\"` (relative to the file) to start "
            "from another config; its keys override the base's."]
    for sec, cls in SECTIONS.items():
        out += ["", f"## [{sec}]", "", cls.__doc__.strip(), "", *header]
        out += [row(k, f, _HINTS[cls][k]) for k, f in _fields_of(cls).items()]
    return "\n".join(out) + "\n"
