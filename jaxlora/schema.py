"""Declarative fields: one place for a spec field's default, documentation and checks.

The library's specs (`lora.LoraSpec`, `quant.QuantRules`, `data.DataConfig`,
`optim.OptimSpec`) and the run-only config sections declare their fields with :func:`field`;
`jaxlora.config` reads that metadata to parse TOML tables onto the specs, validate them with
messages that name the file and the key path, and render the reference (``describe``). So
a default, a choice list or a bound is written once, on the spec itself. The TOML side of
those fields lives here too: coercing TOML values to the field types (`coerce`) and writing
field values back as TOML literals (`plain`, `toml_value`).

This module imports neither jax nor any other part of jaxlora but `jaxlora.errors`, so a
config can be checked without loading the numerical stack.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from jaxlora.errors import ConfigError

__all__ = [
    "FLOAT_DTYPES",
    "field",
    "config_fields",
    "hints",
    "pair_value_type",
    "is_str_tuple",
    "is_str_or_tuple",
    "coerce",
    "check_value",
    "check_fields",
    "positive_values",
    "build",
    "plain",
    "type_name",
    "toml_key",
    "toml_value",
]

FLOAT_DTYPES = ("float32", "bfloat16")
"""Float dtypes a config may name for parameters, activations and adapters."""


def field(default: Any, doc: str, *, toml: bool = True, **checks: Any) -> Any:
    """A frozen-dataclass field with a one-line ``doc`` and declarative checks.

    Args:
      default: the one default (an immutable value: tuples, not lists).
      doc: one line; shown by ``jaxlora config`` and in the resolved ``config.toml``.
      toml: False for a field the config file does not set (the spec's default is used).
      **checks: ``choices`` (allowed values), ``ge``/``gt``/``le``/``lt`` (numeric bounds),
        ``regex`` (the string values are regexes), ``check`` (a function of the value that
        returns an error string or None, or raises ValueError), ``none`` (for an
        ``X | None`` field: the TOML value that stands for None, TOML having no null).
    """
    return dataclasses.field(default=default, metadata={"doc": doc, "toml": toml, **checks})


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of ``cls`` that a config file sets, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)}


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (string annotations evaluated once)."""
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> Any:
    """``X | None`` -> X; anything else unchanged."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return tp


def pair_value_type(tp: Any) -> type | None:
    """For ``tuple[tuple[str, X], ...]`` (a TOML table) return X, else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is tuple:
            inner = typing.get_args(args[0])
            if len(inner) == 2 and inner[0] is str:
                return inner[1]
    return None


def is_str_tuple(tp: Any) -> bool:
    """``tuple[str, ...]``: a TOML list of strings."""
    return typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, Ellipsis)


def is_str_or_tuple(tp: Any) -> bool:
    """``str | tuple[str, ...]``: one string (e.g. a regex) or a list of names."""
    args = typing.get_args(tp)
    return len(args) == 2 and args[0] is str and is_str_tuple(args[1])


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _coerce_scalar(value: Any, tp: type, where: str) -> Any:
    if tp not in _TYPE_NAMES:
        raise TypeError(f"unsupported config field type {tp}")  # a bug in a spec
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        got = f"{type(value).__name__} {value!r}"
        raise ConfigError(f"{where}: expected {_TYPE_NAMES[tp]}, got {got}")
    return float(value) if tp is float else value


def _str_list(value: Any, where: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected {what}, got {type(value).__name__} {value!r}")
    return tuple(_coerce_scalar(v, str, f"{where}[{i}]") for i, v in enumerate(value))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """A TOML value as the field type ``tp`` wants it (lists -> tuples, tables -> pairs).

    Raises:
      ConfigError: ``where: expected <type>, got ...``.
    """
    tp = _optional(tp)
    if is_str_or_tuple(tp):
        if isinstance(value, str):
            return value
        return _str_list(value, where, "a string or a list of strings")
    if is_str_tuple(tp):
        return (value,) if isinstance(value, str) else _str_list(value, where, "a list of strings")
    vt = pair_value_type(tp)
    if vt is not None:
        if isinstance(value, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in value
        ):
            value = dict(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return tuple((str(k), _coerce_scalar(v, vt, f"{where}.{k}")) for k, v in value.items())
    return _coerce_scalar(value, tp, where)


_BOUNDS = (
    ("ge", lambda v, b: v >= b, ">="),
    ("gt", lambda v, b: v > b, ">"),
    ("le", lambda v, b: v <= b, "<="),
    ("lt", lambda v, b: v < b, "<"),
)


def _regexes(value: Any) -> list[str]:
    if isinstance(value, str):  # one regex ("all-linear" is a keyword, and a valid regex)
        return [value]
    if value and isinstance(value[0], tuple):  # regex -> value table
        return [k for k, _ in value]
    return list(value)  # a list of strings: module names for lora targets, regexes elsewhere


def check_value(value: Any, f: dataclasses.Field, where: str) -> None:
    """Run the declarative checks of field ``f`` on ``value``.

    Raises:
      ConfigError: ``where: <what is wrong>`` (with the closest valid choice, if any).
    """
    md = f.metadata
    if md.get("choices") is not None and value not in md["choices"]:
        options = ", ".join(repr(c) for c in md["choices"])
        hint = difflib.get_close_matches(str(value), [str(c) for c in md["choices"]], n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{where}: {value!r} is not one of {options}{extra}")
    for op, ok, word in _BOUNDS:
        if op in md and not (isinstance(value, (int, float)) and ok(value, md[op])):
            raise ConfigError(f"{where}: must be {word} {md[op]}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    if md.get("regex"):
        for pat in _regexes(value):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"{where}: invalid regex {pat!r}: {e}") from None
    if md.get("check") is not None:
        try:
            err = md["check"](value)
        except ValueError as e:
            err = str(e)
        if err:
            raise ConfigError(f"{where}: {err}")


def check_fields(obj: Any) -> None:
    """Run every field's declarative checks on a spec built from Python (``Cls.field: ...``)."""
    name = type(obj).__name__
    for f in dataclasses.fields(obj):
        check_value(getattr(obj, f.name), f, f"{name}.{f.name}")


def positive_values(pairs: tuple[tuple[str, Any], ...]) -> str | None:
    """A ``check`` for regex -> number tables: every value > 0."""
    for key, value in pairs:
        if value <= 0:
            return f"value for {key!r} must be > 0, got {value}"
    return None


def build(cls: type, raw: Any, path: str, src: str, unknown: Callable[[str], Exception]) -> Any:
    """A ``cls`` from the TOML table ``raw`` at ``path`` of file ``src``, validated.

    Each key is coerced and checked against its field's metadata, then ``cls`` is built, so
    its own ``__post_init__`` checks run as well; their errors become ConfigErrors naming the
    table. ``unknown(where)`` makes the error for a key ``cls`` has no field for.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {path}: expected a table [{path}], got {type(raw).__name__}")
    fields = config_fields(cls)
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}"
        if key not in fields:
            raise unknown(where)
        value = coerce(value, hints(cls)[key], f"{src}: {where}")
        check_value(value, fields[key], f"{src}: {where}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as e:  # the spec's own checks (ConfigError is a ValueError too)
        raise ConfigError(f"{src}: {path}: {e}") from None


def plain(value: Any, f: dataclasses.Field, tp: Any) -> Any:
    """A field value as TOML writes it: tuples as lists, pair tuples as tables, None as its
    ``none`` spelling."""
    if value is None:
        return f.metadata["none"]
    if pair_value_type(tp) is not None:
        return {k: v for k, v in value}
    if isinstance(value, tuple):
        return list(value)
    return value


def type_name(f: dataclasses.Field, tp: Any) -> str:
    """A field's type for the reference table: its choices, or a readable TOML type."""
    if f.metadata.get("choices"):
        return " | ".join(f'"{c}"' for c in f.metadata["choices"])
    tp = _optional(tp)
    if is_str_tuple(tp):
        return "list of str"
    if is_str_or_tuple(tp):
        return "str or list of str"
    vt = pair_value_type(tp)
    if vt is not None:
        return f"table str → {vt.__name__}"
    return tp.__name__


def _toml_str(s: str) -> str:
    # JSON string escapes (\" \\ \n \t \uXXXX) are valid TOML basic-string escapes;
    # TOML also forbids a raw DEL.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007F")


def toml_key(k: str) -> str:
    """A bare TOML key when it can be one, else a quoted one."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def toml_value(v: Any) -> str:
    """A TOML literal of a value: bools, numbers (nan/inf too), strings, lists, tables."""
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
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
