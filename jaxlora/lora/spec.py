"""Which base leaves get a LoRA adapter, and the shape and scale each one gets.

LoRA (Hu et al. 2021, arXiv 2106.09685) learns ``delta W = s * A @ B`` with ``A [in, r]``,
``B [r, out]`` and ``s = alpha / r``; rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) uses
``s = alpha / sqrt(r)`` so that learning does not collapse at high rank (`lora_scale`).

Selection is static data (`LoraSpec.targets`: a regex, module names or ``"all-linear"`` over
``/``-joined parameter paths), resolved once outside ``jit`` by `resolve_targets`. A target
that matches nothing is an error that lists the closest paths. `leaf_geometry` turns a
targeted leaf's shape into its adapter geometry (stacked axes, ``in``, ``out``, rank, scale).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from jaxlora import schema
from jaxlora.paths import flatten_paths

if TYPE_CHECKING:  # this module imports no JAX: configs hold a LoraSpec
    from jaxlora.lora.primitive import Params

__all__ = ["Targets", "METHODS", "LoraSpec", "lora_scale", "resolve_targets", "check_ranks",
           "LeafGeometry", "leaf_geometry"]

Targets = str | tuple[str, ...]
"""A regex over leaf paths, a tuple of module names (path components) or ``"all-linear"``."""
_SCALINGS = ("standard", "rslora")
_INITS = ("kaiming", "gaussian", "pissa", "loftq")
METHODS = ("lora", "dora")
_ADAPTABLE = ("kernel", "embedding")
_DTYPES = ("float32", "bfloat16", "float16")  # adapter dtypes (jnp names)


def _as_pairs(x: Any, name: str) -> tuple[tuple[str, Any], ...]:
    if x is None:
        return ()
    items = x.items() if isinstance(x, Mapping) else x
    out = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"LoraSpec.{name}: expected (regex, value) pairs, got {item!r}")
        pat, val = item
        re.compile(pat)
        out.append((str(pat), val))
    return tuple(out)


def _targets_form(value: Any) -> str | None:
    """The error of a targets value in the wrong form, or None (also a config field check)."""
    if isinstance(value, tuple) and "all-linear" in value:
        return "write 'all-linear' as a string, not inside a list (a list holds module names)"
    return None


def _as_targets(x: Any, name: str) -> Targets:
    if x is None and name == "exclude":  # None: exclude nothing, the same as ()
        return ()
    if isinstance(x, str):
        if x != "all-linear":
            try:
                re.compile(x)
            except re.error as e:
                raise ValueError(f"LoraSpec.{name}: bad regex {x!r}: {e}") from None
        return x
    if isinstance(x, Sequence) and all(isinstance(t, str) for t in x):
        err = _targets_form(tuple(x))
        if err:
            raise ValueError(f"LoraSpec.{name}: {err}")
        return tuple(x)
    raise ValueError(f"LoraSpec.{name}: expected a regex, a list of module names or 'all-linear'")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The low-rank adapters: which base leaves get one, their shape, scale and init.

    ``y = x W + scale * dropout(x) A B``; the ``[lora]`` table of a config file. Lists and
    dicts given to the fields are stored as tuples so the spec stays hashable. Only leaves
    named ``kernel`` or ``embedding`` are adaptable.
    """

    rank: int = schema.field(8, "Adapter rank r (default for every target).", ge=1)
    alpha: float = schema.field(
        16.0, "Scale numerator: scale = alpha/r (standard) or alpha/sqrt(r) (rslora).", gt=0
    )
    scaling: str = schema.field(
        "standard", "standard: alpha/r (Hu et al. 2021); rslora: alpha/sqrt(r) (Kalajdzievski 2023).",
        choices=_SCALINGS,
    )
    dropout: float = schema.field(
        0.0, "Dropout on the adapter input during training, in [0, 1) (needs a key).", ge=0, lt=1
    )
    targets: Targets = schema.field(
        "all-linear",
        "'all-linear' (every kernel but the head and embeddings), a list of module names "
        "(['q_proj', 'v_proj']: a path component) or one regex string (re.search over paths).",
        regex=True, check=_targets_form,
    )
    exclude: Targets = schema.field(
        (), "Same forms as targets; matching leaves are not adapted (empty = none).", regex=True
    )
    method: str = schema.field(
        "lora", "lora: x (W + s A B); dora: DoRA (Liu et al. 2024), a learned magnitude per "
        "output column times the direction (W + s A B) / ||W + s A B|| (linear kernels only).",
        choices=METHODS,
    )
    init: str = schema.field(
        "kaiming", "Init of A (B starts at zero): kaiming (loralib's uniform), gaussian "
        "(N(0, 1/r^2)); pissa uses the base's SVD (init_pissa); loftq (Li et al. 2023) "
        "quantizes W - s A B and fits A B to the residual, on load (a quantized base only). "
        "Embeddings: A = 0, B ~ N(0, 1).",
        choices=_INITS,
    )
    loftq_iters: int = schema.field(
        1, "LoftQ's alternating steps T (quantize, then rank-r SVD of the residual).", ge=1
    )
    rank_pattern: tuple[tuple[str, int], ...] = schema.field(
        (), "Table regex -> rank overriding `rank` for matching paths (first match wins).",
        regex=True, check=schema.positive_values,
    )
    alpha_pattern: tuple[tuple[str, float], ...] = schema.field(
        (), "Table regex -> alpha overriding `alpha` for matching paths (first match wins).",
        regex=True, check=schema.positive_values,
    )
    dtype: str = schema.field(
        "float32", "Dtype of the adapter parameters A and B.", choices=schema.FLOAT_DTYPES
    )
    stacked: tuple[tuple[str, int], ...] = schema.field(
        ((r"^layers/", 1),),
        "(regex, n) pairs: leaves whose path matches carry n leading (stacked) axes.",
        toml=False,
    )

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("targets", _as_targets(self.targets, "targets"))
        set_("exclude", _as_targets(self.exclude, "exclude"))
        set_("rank_pattern", _as_pairs(self.rank_pattern, "rank_pattern"))
        set_("alpha_pattern", _as_pairs(self.alpha_pattern, "alpha_pattern"))
        set_("stacked", _as_pairs(self.stacked, "stacked"))
        if self.scaling not in _SCALINGS:
            raise ValueError(f"LoraSpec.scaling must be one of {_SCALINGS}, got {self.scaling!r}")
        if self.init not in _INITS:
            raise ValueError(f"LoraSpec.init must be one of {_INITS}, got {self.init!r}")
        if self.method not in METHODS:
            raise ValueError(f"LoraSpec.method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.loftq_iters, (int, np.integer)) or self.loftq_iters < 1:
            raise ValueError(f"LoraSpec.loftq_iters must be an integer >= 1, got {self.loftq_iters!r}")
        for where, r in (
            ("rank", self.rank),
            *((f"rank_pattern[{p!r}]", v) for p, v in self.rank_pattern),
        ):
            if not isinstance(r, (int, np.integer)) or r <= 0:
                raise ValueError(f"LoraSpec.{where} must be a positive integer, got {r!r}")
        for where, a in (
            ("alpha", self.alpha),
            *((f"alpha_pattern[{p!r}]", v) for p, v in self.alpha_pattern),
        ):
            if not a > 0:
                raise ValueError(f"LoraSpec.{where} must be > 0, got {a!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"LoraSpec.dtype must be one of {_DTYPES}, got {self.dtype!r}")


def lora_scale(alpha: float, rank: int, scaling: str = "standard") -> float:
    """``alpha / r`` (LoRA, arXiv 2106.09685) or ``alpha / sqrt(r)`` (rsLoRA, arXiv 2312.03732)."""
    if scaling == "rslora":
        return float(alpha) / math.sqrt(rank)
    if scaling == "standard":
        return float(alpha) / rank
    raise ValueError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")


def _first_match(pairs: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    for pat, val in pairs:
        if re.search(pat, path):
            return val
    return default


def _n_lead(spec: LoraSpec, path: str) -> int:
    return int(_first_match(spec.stacked, path, 0))


def _matches(targets: Targets, path: str, shape: tuple[int, ...], n_lead: int) -> bool:
    parts = path.split("/")
    if targets == "all-linear":
        return (
            parts[-1] == "kernel"
            and len(shape) - n_lead >= 2
            and "lm_head" not in parts
            and not any("embed" in p for p in parts)
        )
    if isinstance(targets, str):
        return re.search(targets, path) is not None
    return any(t in parts[:-1] for t in targets)


def resolve_targets(base: Params, spec: LoraSpec) -> list[str]:
    """The sorted paths of the base leaves that ``spec`` adapts (resolved outside jit).

    Raises:
      ValueError: when a target (or the whole selection) matches nothing; the message lists
        the closest adaptable paths (difflib).
    """
    flat = flatten_paths(base)
    cands = {
        p: tuple(v.shape)
        for p, v in flat.items()
        if p.split("/")[-1] in _ADAPTABLE and len(v.shape) - _n_lead(spec, p) >= 2
    }

    def hits(t: Targets) -> list[str]:
        return [p for p, s in cands.items() if _matches(t, p, s, _n_lead(spec, p))]

    def near(word: str) -> list[str]:
        return difflib.get_close_matches(word, list(cands), n=3, cutoff=0.0)

    targets = spec.targets
    if isinstance(targets, tuple):
        for t in targets:
            if not hits((t,)):
                raise ValueError(
                    f"lora.targets: module {t!r} matches no adaptable parameter; closest: {near(t)}"
                )
    chosen = set(hits(targets))
    if not chosen:
        raise ValueError(
            f"lora.targets: {targets!r} match no adaptable parameter; closest: {near(str(targets))}"
        )
    if spec.exclude is not None:
        chosen -= set(hits(spec.exclude))
        if not chosen:
            raise ValueError(f"LoRA exclude {spec.exclude!r} removes every target {targets!r}")
    return sorted(chosen)


class LeafGeometry(NamedTuple):
    """The adapter a `LoraSpec` gives one base leaf ``[*lead, in, *out]``.

    The adapter is ``a [*lead, in, rank]``, ``b [*lead, rank, *out]``, applied with ``scale``.
    """

    lead: tuple[int, ...]
    """Stacked (layer) axes, from `LoraSpec.stacked`."""
    d_in: int
    """The input axis (the vocabulary for an embedding table)."""
    out: tuple[int, ...]
    """The output axes (one or several, like the base kernel's)."""
    rank: int
    """From `LoraSpec.rank_pattern` (first match) or `LoraSpec.rank`."""
    scale: float
    """`lora_scale` of the leaf's alpha and rank."""


def leaf_geometry(path: str, shape: tuple[int, ...], spec: LoraSpec) -> LeafGeometry:
    """The adapter geometry of the targeted leaf at ``path`` with base ``shape``, validated.

    Raises:
      ValueError: the rank exceeds ``min(in, prod(out))`` (the update could not be low-rank).
    """
    n = _n_lead(spec, path)
    lead, d_in, out = shape[:n], shape[n], shape[n + 1 :]
    r = int(_first_match(spec.rank_pattern, path, spec.rank))
    alpha = float(_first_match(spec.alpha_pattern, path, spec.alpha))
    d_out = int(np.prod(out))
    if r > min(d_in, d_out):
        raise ValueError(
            f"LoRA rank {r} for {path!r} exceeds min(in, out) = min({d_in}, {d_out}) of {shape}"
        )
    return LeafGeometry(lead, d_in, out, r, lora_scale(alpha, r, spec.scaling))


def check_ranks(base: Params, spec: LoraSpec) -> None:
    """Refuse, before anything is built, every targeted leaf whose rank exceeds ``min(in,
    out)``, naming each one and the largest rank all the targets allow.

    `base` needs only the leaves' ``.shape`` (a model's `param_shapes`, nothing loaded).

    Raises:
      ValueError: one line; it suggests a lower rank, a `rank_pattern` cap or an exclusion.
    """
    flat = flatten_paths(base)
    bad, limit = [], None
    for path in resolve_targets(base, spec):
        shape = tuple(flat[path].shape)
        n = _n_lead(spec, path)
        most = min(shape[n], int(np.prod(shape[n + 1 :])))
        limit = most if limit is None else min(limit, most)
        r = int(_first_match(spec.rank_pattern, path, spec.rank))
        if r > most:
            bad.append(f"{path} (rank {r} > {most})")
    if bad:
        raise ValueError(
            f"lora.rank: {len(bad)} targeted layer(s) are narrower than their rank: "
            f"{', '.join(bad)}; the largest rank every target allows is {limit}: lower "
            "lora.rank, cap those layers with lora.rank_pattern, or exclude them")
