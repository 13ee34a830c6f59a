"""LoRA adapters as a separate pytree, and the one linear primitive that applies them.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a weight ``W [in, out]`` and learns a
low-rank update ``delta W = A @ B`` with ``A [in, r]``, ``B [r, out]``, scaled by
``s = alpha / r``; rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) uses ``s = alpha / sqrt(r)``
so that learning does not collapse at high rank.

Design (see ``docs/DESIGN.md``):

* The base parameters (``Params``: nested dict of ``jax.Array`` or ``quant.QTensor`` leaves)
  and the adapters (``Adapters``: a nested dict mirroring the *targeted* base paths, whose
  leaves are `LoraPair`) are two separate pytrees. Only the adapters are trained.
* `attach` puts a `LoraWeight` view at every targeted base leaf. Model code only ever calls
  `linear` / `embed` / `attend` on whatever leaf it holds (Array, QTensor or LoraWeight) and
  knows nothing else about LoRA or quantization.
* `linear` computes ``y = x @ W + s * (dropout(x) @ A) @ B``: the low-rank path goes through
  ``[..., r]`` and never forms ``A @ B`` at full size, so the gradient with respect to the
  adapters never materializes an ``[in, out]`` weight gradient. QTensor bases are
  dequantized inside the jitted program (XLA fuses it).
* Stacked leaves (under ``layers/``) carry leading axes ``[*lead, ...]`` on every child
  (``w``, ``a``, ``b``, the dropout key), so ``jax.lax.scan`` slices them all together.
* Selection (`LoraSpec.targets`) is static: regexes / module names over ``/``-joined paths,
  resolved once outside jit by `resolve_targets`; a target that matches nothing is an error
  that lists the closest paths.
* PiSSA (arXiv 2404.02948) changes the base as well as the adapters, so it has its own entry
  point, `init_pissa(base, spec) -> (residual_base, adapters)`; `init` refuses it.
* Any Flax NNX model: `nnx_params(model)` gives its ``Params``; `nnx_bind(model, params,
  adapters)` returns a copy whose nnx.Linear / LinearGeneral / Einsum / Embed layers run
  this same primitive (with float or QTensor bases).

Example::

    spec = LoraSpec(rank=16, alpha=32.0, targets="all-linear")
    adapters = init(jax.random.key(0), base, spec)
    y = model_forward(attach(base, adapters, dropout_key), tokens)  # model calls `linear`
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_derivatives

from jaxlora import quant, schema
from jaxlora.paths import flatten_paths, unflatten_paths

__all__ = [
    "Params",
    "Adapters",
    "LoraPair",
    "LoraWeight",
    "LoraSpec",
    "Summary",
    "init",
    "init_pissa",
    "attach",
    "linear",
    "register_linear",
    "embed",
    "attend",
    "merge",
    "unmerge",
    "check_fit",
    "resolve_targets",
    "lora_scale",
    "summary",
    "flatten_paths",
    "unflatten_paths",
    "nnx_params",
    "nnx_bind",
]

Array = jax.Array
Params = dict[str, Any]
"""Nested ``dict[str, ...]`` of ``jax.Array`` / ``quant.QTensor`` leaves (paths joined by ``/``)."""
Adapters = dict[str, Any]
"""Nested ``dict[str, ...]`` mirroring the targeted base paths, with `LoraPair` leaves."""


# --------------------------------------------------------------------------------------------
# Leaves
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """The trainable adapter of one base leaf.

    Attributes:
      a: ``[*lead, in, r]`` (for an embedding table ``[*lead, vocab, r]``).
      b: ``[*lead, r, *out]`` (``out`` may be several axes, like the base kernel's).
      scale: static ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
      dropout: static dropout rate applied to the input of the low-rank path in training.
    """

    a: Array
    b: Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])


jax.tree_util.register_dataclass(LoraPair, data_fields=["a", "b"], meta_fields=["scale", "dropout"])


@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A base weight with its adapter attached: what `attach` puts at a targeted leaf.

    Attributes:
      w: base ``[*lead, in, *out]``, a ``jax.Array`` or a ``quant.QTensor``.
      a: ``[*lead, in, r]``; b: ``[*lead, r, *out]``.
      key: ``None`` (no dropout: inference) or a PRNG key per stacked layer, ``[*lead, 2]``
        uint32 or a typed key array ``[*lead]``, so that ``lax.scan`` slices it with the rest.
      scale, dropout: static, as in `LoraPair`.
    """

    w: Any
    a: Array
    b: Array
    key: Array | None = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def ndim(self) -> int:
        return len(self.w.shape)

    @property
    def dtype(self) -> Any:
        return self.w.dtype


jax.tree_util.register_dataclass(
    LoraWeight, data_fields=["w", "a", "b", "key"], meta_fields=["scale", "dropout"]
)


# --------------------------------------------------------------------------------------------
# Quantized bases
# --------------------------------------------------------------------------------------------


def _is_qtensor(x: Any) -> bool:
    return isinstance(x, quant.QTensor)


def _dense(w: Any, dtype: Any) -> Array:
    """The base weight as a dense array of ``dtype`` (dequantized inside jit for QTensor)."""
    if _is_qtensor(w):
        return quant.dequantize(w, dtype)
    return jnp.asarray(w).astype(dtype)


# --------------------------------------------------------------------------------------------
# The primitive
# --------------------------------------------------------------------------------------------


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout on ``x``; identity without a key (inference) or with rate 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _contract1(x: Array, w: Array) -> Array:
    """``x [..., in] . w [in, *out] -> [..., *out]``."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


_LINEAR_RULES: dict[type, Callable[..., Array]] = {}


def register_linear(cls: type, fn: Callable[..., Array]) -> None:
    """Extension point: `linear` sends leaves of exactly type ``cls`` to ``fn(x, w, bias)``.

    For weight views defined outside this module (e.g. ``jaxlora.multi.MultiLoraWeight``,
    several adapters chosen per batch row), so model code still calls only `linear`.
    """
    if cls in (LoraWeight,) or not isinstance(cls, type):
        raise ValueError(f"register_linear: cannot register {cls!r}")
    _LINEAR_RULES[cls] = fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x: Array, a: Array, b: Array, scale: float) -> Array:
    """``s * (x @ A) @ B`` for ``x [..., in]``, ``a [in, r]``, ``b [r, *out]``."""
    return scale * _contract1(_contract1(x, a), b)


def _low_rank_fwd(x, a, b, scale):
    return _low_rank(x, a, b, scale), (x, a, b)


def _low_rank_bwd(scale, res, dy):
    # Written out on token-flattened 2-D operands: XLA:CPU otherwise picks transposed layouts
    # for the activation cotangents of the skinny rank-r matmuls, which doubled a block's
    # backward time on SmolLM2 (benchmarks/RESULTS.md).
    x, a, b = res
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    b2 = b.reshape(b.shape[0], -1)  # [r, out]
    dy2 = dy.reshape(x2.shape[0], -1)  # [N, out]
    dh = scale * (dy2 @ b2.T)  # [N, r]
    da = x2.T @ dh  # [in, r]
    db = scale * ((x2 @ a).T @ dy2)  # [r, out]
    dx = (dh @ a.T).reshape(x.shape)  # [..., in]
    return dx, da, db.reshape(b.shape)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _merged_lora(x: Array, w: Any, a: Array, b: Array, scale: float) -> Array:
    """``x @ (W + s A B)`` for ``x [..., in]``, ``w [in, *out]`` (array or QTensor), ``a [in, r]``.

    Without dropout the low-rank path folds into the weight: one matmul forward and one for
    the input gradient instead of two skinny matmuls and an add over ``[..., out]`` each way.
    ``W + s A B`` is a per-call temporary (the dequantized weight is one already); the
    backward rebuilds it from the packed codes rather than keeping it.
    """
    return _contract1(x, _effective(w, a, b, scale, x.dtype))


def _effective(w: Any, a: Array, b: Array, scale: float, dtype: Any) -> Array:
    return _dense(w, dtype) + scale * _contract1(a, b)


def _merged_lora_fwd(x, w, a, b, scale):
    # symbolic_zeros: each argument leaf arrives as CustomVJPPrimal(value, perturbed), which
    # tells whether a float base weight is being differentiated (full fine-tuning through a
    # LoraWeight); only then does the backward form the weight gradient.
    x, a, b = x.value, a.value, b.value
    primal = lambda t: isinstance(t, custom_derivatives.CustomVJPPrimal)  # noqa: E731
    w_grad = not _is_qtensor(w) and any(p.perturbed for p in jax.tree.leaves(w, is_leaf=primal))
    w = jax.tree.map(lambda p: p.value, w, is_leaf=primal)
    # The last residual is the flag: None, or a second (no-copy) reference to w.
    return _merged_lora(x, w, a, b, scale), (x, _contract1(x, a), w, a, b, w if w_grad else None)


def _merged_lora_bwd(scale, res, dy):
    x, xa, w, a, b, w_ref = res
    if isinstance(dy, custom_derivatives.SymbolicZero):
        return None, None, None, None
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    b2 = b.reshape(b.shape[0], -1)  # [r, out]
    dy2 = dy.reshape(x2.shape[0], -1)  # [N, out]
    w2 = _effective(w, a, b, scale, x.dtype).reshape(x2.shape[1], -1)  # [in, out]
    dx = (dy2 @ w2.T).reshape(x.shape)
    da = x2.T @ (scale * (dy2 @ b2.T))  # [in, r]
    db = scale * (xa.reshape(-1, xa.shape[-1]).T @ dy2)  # [r, out]
    dw = None if w_ref is None else (x2.T @ dy2).reshape(w.shape).astype(w.dtype)
    return dx, dw, da, db.reshape(b.shape)


_merged_lora.defvjp(_merged_lora_fwd, _merged_lora_bwd, symbolic_zeros=True)


def _dequant_matmul(x: Array, q: Any) -> Array:
    return _contract1(x, quant.dequantize(q, x.dtype))


# Rematerialized so that the backward pass dequantizes the codes again instead of keeping the
# float weight as a residual: otherwise every layer's dense W would be saved for the input
# gradient, a full-precision copy of the model during training.
_dequant_matmul_remat = jax.checkpoint(_dequant_matmul)


def _base_matmul(x: Array, w: Any) -> Array:
    """``x @ W`` for a float or QTensor base weight."""
    if _is_qtensor(w):
        return _dequant_matmul_remat(x, w)
    return _contract1(x, jnp.asarray(w).astype(x.dtype))


def linear(x: Array, w: Any, bias: Array | None = None) -> Array:
    """``y = x @ W (+ s * (dropout(x) @ A) @ B) (+ bias)``: the one projection primitive.

    Args:
      x: ``[..., in]``; its dtype is the compute dtype.
      w: ``[in, *out]`` as a ``jax.Array``, a ``quant.QTensor`` (dequantized to ``x.dtype``
        inside the program) or a `LoraWeight` (with ``a [in, r]``, ``b [r, *out]``).
      bias: optional ``[*out]``.

    Returns:
      ``[..., *out]`` in ``x.dtype``. The LoRA path goes through ``[..., r]``; ``A @ B`` is
      never formed.
    """
    rule = _LINEAR_RULES.get(type(w))
    if rule is not None:
        return rule(x, w, bias)
    if isinstance(w, LoraWeight) and (w.key is None or w.dropout <= 0.0):
        y = _merged_lora(x, w.w, w.a.astype(x.dtype), w.b.astype(x.dtype), w.scale)
    elif isinstance(w, LoraWeight):
        y = _base_matmul(x, w.w)  # [..., *out]
        xd = _dropout(x, w.dropout, w.key)
        y = y + _low_rank(xd, w.a.astype(x.dtype), w.b.astype(x.dtype), w.scale)  # [..., *out]
    else:
        y = _base_matmul(x, w)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def embed(ids: Array, table: Any, dtype: Any = None) -> Array:
    """Row lookup ``table[ids]`` with LoRA on embeddings: ``W[ids] + s * A[ids] @ B``.

    Args:
      ids: integer ``[...]``.
      table: ``[vocab, d]`` Array, QTensor (dequantized inside the program) or `LoraWeight`
        with ``a [vocab, r]`` (zero at init, per PEFT) and ``b [r, d]``. No dropout is applied
        to embeddings (as in PEFT).
      dtype: output dtype; defaults to the (dequantized) table dtype.

    Returns:
      ``[..., d]``.
    """
    base = table.w if isinstance(table, LoraWeight) else table
    dtype = dtype or base.dtype
    y = jnp.take(_dense(base, dtype), ids, axis=0)  # [..., d]
    if isinstance(table, LoraWeight):
        h = jnp.take(table.a.astype(dtype), ids, axis=0)  # [..., r]
        y = y + table.scale * _contract1(h, table.b.astype(dtype))
    return y


def attend(x: Array, table: Any) -> Array:
    """Tied LM head ``x @ table.T``: ``[..., d] x [vocab, d] -> [..., vocab]``.

    With a `LoraWeight` table (``a [vocab, r]``, ``b [r, d]``) this is
    ``x @ W.T + s * (x @ B.T) @ A.T``, again through ``[..., r]`` only.
    """
    base = table.w if isinstance(table, LoraWeight) else table
    w = _dense(base, x.dtype)  # [vocab, d]
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))  # [..., vocab]
    if isinstance(table, LoraWeight):
        h = jax.lax.dot_general(x, table.b.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
        y = y + table.scale * jax.lax.dot_general(
            h, table.a.astype(x.dtype), (((h.ndim - 1,), (1,)), ((), ()))
        )
    return y


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def _replace_paths(tree: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> dict:
    """A copy of ``tree`` with the leaves at the paths of ``new`` replaced."""
    out = {}
    for k in tree:
        v = tree[k]
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out[k] = _replace_paths(v, new, p)
        else:
            out[k] = new.get(p, v)
    return out


# --------------------------------------------------------------------------------------------
# attach / check_fit
# --------------------------------------------------------------------------------------------


def _lead(pair: LoraPair) -> tuple[int, ...]:
    return tuple(pair.a.shape[:-2])


def check_fit(base: Params, adapters: Adapters) -> None:
    """Raise ``ValueError`` (one line, naming the path) unless every adapter fits its base leaf.

    ``a`` must be ``[*lead, in, r]`` and ``b`` ``[*lead, r, *out]`` where the base leaf is
    ``[*lead, in, *out]``.
    """
    flat_base = flatten_paths(base)
    for path, pair in flatten_paths(adapters).items():
        if not isinstance(pair, LoraPair):
            raise ValueError(f"adapter at {path!r} is {type(pair).__name__}, not a LoraPair")
        if path not in flat_base:
            near = difflib.get_close_matches(path, list(flat_base), n=3, cutoff=0.3)
            raise ValueError(f"adapter path {path!r} is not in the base params; closest: {near}")
        wshape = tuple(flat_base[path].shape)
        a, b = tuple(pair.a.shape), tuple(pair.b.shape)
        n_lead = len(a) - 2
        ok = (
            len(a) >= 2
            and len(wshape) >= n_lead + 2
            and a[:n_lead] == wshape[:n_lead]
            and a[-2] == wshape[n_lead]
            and b[:n_lead] == wshape[:n_lead]
            and b[n_lead] == a[-1]
            and b[n_lead + 1 :] == wshape[n_lead + 1 :]
        )
        if not ok:
            raise ValueError(
                f"adapter at {path!r} does not fit the base: base {wshape}, a {a}, b {b} "
                "(expected a [*lead, in, r], b [*lead, r, *out])"
            )


def attach(base: Params, adapters: Adapters, dropout_key: Array | None = None) -> Params:
    """Replace each targeted base leaf by a `LoraWeight` view (base + adapter).

    Args:
      base: the frozen base params.
      adapters: the adapter tree (mirrors targeted base paths).
      dropout_key: ``None`` for inference (no dropout). In training, a PRNG key; it is split
        per targeted leaf (in sorted path order) and per stacked layer, so each leaf carries
        keys ``[*lead, 2]`` (or typed ``[*lead]``) that ``lax.scan`` slices with the weights.
        Leaves whose dropout rate is 0 get no key.

    Returns:
      A tree shaped like ``base`` (same dict structure) whose targeted leaves are LoraWeight.
    """
    check_fit(base, adapters)
    flat_base = flatten_paths(base)
    flat_ad = flatten_paths(adapters)
    paths = sorted(flat_ad)
    leaf_keys = (
        jax.random.split(dropout_key, len(paths)) if dropout_key is not None and paths else None
    )
    new = {}
    for i, path in enumerate(paths):
        pair = flat_ad[path]
        key = None
        if leaf_keys is not None and pair.dropout > 0.0:
            lead = _lead(pair)
            key = jax.random.split(leaf_keys[i], lead) if lead else leaf_keys[i]
        new[path] = LoraWeight(
            w=flat_base[path], a=pair.a, b=pair.b, key=key, scale=pair.scale, dropout=pair.dropout
        )
    return _replace_paths(base, new)


# --------------------------------------------------------------------------------------------
# Spec and target selection
# --------------------------------------------------------------------------------------------

Targets = str | tuple[str, ...]
_SCALINGS = ("standard", "rslora")
_INITS = ("kaiming", "gaussian", "pissa")
_ADAPTABLE = ("kernel", "embedding")


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
    init: str = schema.field(
        "kaiming", "Init of A (B starts at zero): kaiming (loralib's uniform), gaussian "
        "(N(0, 1/r^2)); pissa uses the base's SVD (init_pissa). Embeddings: A = 0, B ~ N(0, 1).",
        choices=_INITS,
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
        jnp.dtype(self.dtype)


def lora_scale(alpha: float, rank: int, scaling: str = "standard") -> float:
    """``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA)."""
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
                    f"LoRA target module {t!r} matches no adaptable parameter; closest: {near(t)}"
                )
    chosen = set(hits(targets))
    if not chosen:
        raise ValueError(
            f"LoRA targets {targets!r} match no adaptable parameter; closest: {near(str(targets))}"
        )
    if spec.exclude is not None:
        chosen -= set(hits(spec.exclude))
        if not chosen:
            raise ValueError(f"LoRA exclude {spec.exclude!r} removes every target {targets!r}")
    return sorted(chosen)


# --------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------


def _leaf_geometry(path: str, shape: tuple[int, ...], spec: LoraSpec):
    """``(lead, in, out_axes, rank, scale)`` for one targeted leaf, validated."""
    n = _n_lead(spec, path)
    lead, d_in, out = shape[:n], shape[n], shape[n + 1 :]
    r = int(_first_match(spec.rank_pattern, path, spec.rank))
    alpha = float(_first_match(spec.alpha_pattern, path, spec.alpha))
    d_out = int(np.prod(out))
    if r > min(d_in, d_out):
        raise ValueError(
            f"LoRA rank {r} for {path!r} exceeds min(in, out) = min({d_in}, {d_out}) of {shape}"
        )
    return lead, d_in, out, r, lora_scale(alpha, r, spec.scaling)


def _path_key(key: Array, path: str) -> Array:
    """A key derived from the path string, so adding a target does not reshuffle the others."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init(key: Array, base: Params, spec: LoraSpec) -> Adapters:
    """Create the adapters for ``base`` (Array or QTensor leaves) according to ``spec``.

    Each targeted leaf ``[*lead, in, *out]`` gets ``LoraPair(a [*lead, in, r],
    b [*lead, r, *out])``. Linear kernels: A kaiming-uniform or gaussian, B = 0; embedding
    tables (leaf named ``embedding``): A = 0, B ~ N(0, 1). Either way ``A @ B = 0`` at init,
    so the adapted model starts exactly at the base model.

    For ``spec.init == "pissa"`` the base must change too: call `init_pissa`.
    """
    if spec.init == "pissa":
        raise ValueError(
            "LoraSpec.init='pissa' replaces the base weights: use init_pissa(base, spec)"
        )
    flat = flatten_paths(base)
    geometry = {
        path: _leaf_geometry(path, tuple(flat[path].shape), spec)
        for path in resolve_targets(base, spec)
    }  # static, resolved outside jit
    shapes = tuple((p, lead, d_in, d_out, r) for p, (lead, d_in, d_out, r, _) in geometry.items())
    arrays = _init_arrays(key, shapes, spec.init, spec.dtype)
    return unflatten_paths(
        {
            p: LoraPair(a=a, b=b, scale=geometry[p][4], dropout=float(spec.dropout))
            for p, (a, b) in arrays.items()
        }
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_arrays(key: Array, shapes: tuple, init: str, dtype: str) -> dict[str, tuple]:
    """All adapter arrays in one compiled program (cached per geometry, not per call)."""
    dtype = jnp.dtype(dtype)
    out = {}
    for path, lead, d_in, d_out, r in shapes:
        a_shape, b_shape = (*lead, d_in, r), (*lead, r, *d_out)
        k = _path_key(key, path)
        if path.split("/")[-1] == "embedding":  # PEFT: roles swap for embeddings
            a = jnp.zeros(a_shape, dtype)
            b = jax.random.normal(k, b_shape, dtype)
        elif init == "kaiming":  # loralib kaiming_uniform_(a=sqrt(5)) on A (r, in)
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, a_shape, dtype, -bound, bound)
            b = jnp.zeros(b_shape, dtype)
        else:  # "gaussian": PEFT normal(std=1/r)
            a = jax.random.normal(k, a_shape, dtype) / r
            b = jnp.zeros(b_shape, dtype)
        out[path] = (a, b)
    return out


def _requantize_like(x: Array, like: Any) -> Any:
    """Quantize ``x`` with the settings (and stacked axes) of the QTensor ``like``."""
    return quant.quantize(
        x.astype(like.dtype),
        qtype=like.qtype,
        block_size=like.block_size,
        double_quant=like.double_quant,
        batch_dims=len(like.batch_shape),
    )


def init_pissa(base: Params, spec: LoraSpec) -> tuple[Params, Adapters]:
    """PiSSA init (Meng et al. 2024, arXiv 2404.02948): adapters from the top-r SVD of W.

    With ``W [in, out] = U S Vh``: ``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) Vh_r`` and the
    base becomes the residual ``W - s A @ B`` (so the model's function is unchanged up to
    rounding). Returns ``(residual_base, adapters)``; a QTensor base is dequantized, decomposed
    in float32 and the residual re-quantized with the same settings.
    """
    flat = flatten_paths(base)
    dtype = jnp.dtype(spec.dtype)
    new_base, out = {}, {}
    for path in resolve_targets(base, spec):
        w = flat[path]
        lead, d_in, d_out, r, scale = _leaf_geometry(path, tuple(w.shape), spec)
        w32 = _dense(w, jnp.float32).reshape(*lead, d_in, -1)  # [*lead, in, out]
        u, s, vh = jnp.linalg.svd(w32, full_matrices=False)
        sr = jnp.sqrt(s[..., :r] / scale)  # [*lead, r]
        a = u[..., :, :r] * sr[..., None, :]  # [*lead, in, r]
        b = sr[..., :, None] * vh[..., :r, :]  # [*lead, r, out]
        resid = (w32 - scale * (a @ b)).reshape(w.shape)
        new_base[path] = _requantize_like(resid, w) if _is_qtensor(w) else resid.astype(w.dtype)
        b = b.reshape(*lead, r, *d_out)
        out[path] = LoraPair(
            a.astype(dtype), b.astype(dtype), scale=scale, dropout=float(spec.dropout)
        )
    return _replace_paths(base, new_base), unflatten_paths(out)


# --------------------------------------------------------------------------------------------
# merge / unmerge / summary
# --------------------------------------------------------------------------------------------


def _delta(pair: LoraPair) -> Array:
    """``s * A @ B`` in float32, ``[*lead, in, *out]`` (only for merging, never in forward)."""
    a = pair.a.astype(jnp.float32)
    b = pair.b.astype(jnp.float32)
    n = a.ndim - 2
    b2 = b.reshape(*b.shape[: n + 1], -1)  # [*lead, r, out]
    return (pair.scale * (a @ b2)).reshape(*a.shape[:-1], *b.shape[n + 1 :])


def merge(base: Params, adapters: Adapters) -> Params:
    """``W + s * A @ B`` at every adapted leaf: a float tree for export / fast inference.

    Adapted QTensor leaves are dequantized, summed in float32 and cast to their original
    dtype (they are *not* re-quantized, which would add rounding error; see peft#1043).
    Leaves without an adapter are returned unchanged.
    """
    check_fit(base, adapters)
    flat, flat_ad = flatten_paths(base), flatten_paths(adapters)
    return _replace_paths(base, _merge_leaves({p: flat[p] for p in flat_ad}, flat_ad, 1.0))


def unmerge(merged: Params, adapters: Adapters) -> Params:
    """Inverse of `merge` for float bases: ``W - s * A @ B`` (up to float rounding)."""
    check_fit(merged, adapters)
    flat, flat_ad = flatten_paths(merged), flatten_paths(adapters)
    return _replace_paths(merged, _merge_leaves({p: flat[p] for p in flat_ad}, flat_ad, -1.0))


@functools.partial(jax.jit, static_argnums=(2,))
def _merge_leaves(ws: dict[str, Any], pairs: dict[str, LoraPair], sign: float) -> dict:
    """``W + sign * s * A @ B`` per path, in float32, cast back to each base dtype."""
    return {
        p: (_dense(w, jnp.float32) + sign * _delta(pairs[p])).astype(w.dtype) for p, w in ws.items()
    }


class Summary(NamedTuple):
    """Trainable-parameter accounting for a base + adapters pair."""

    trainable: int
    total: int
    adapter_bytes: int
    n_adapted: int

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.fraction:.4f} || adapters: {self.n_adapted} leaves, "
            f"{self.adapter_bytes / 2**20:.2f} MiB"
        )


def summary(base: Params, adapters: Adapters) -> Summary:
    """Count adapter parameters vs all parameters (a QTensor counts its logical elements)."""
    leaves = jax.tree.leaves(adapters)
    trainable = sum(int(x.size) for x in leaves)
    nbytes = sum(int(x.size) * x.dtype.itemsize for x in leaves)
    n_base = sum(int(np.prod(v.shape)) for v in flatten_paths(base).values())
    return Summary(trainable, n_base + trainable, nbytes, len(flatten_paths(adapters)))


# --------------------------------------------------------------------------------------------
# Flax NNX: run a user's own model with LoRA / QTensor leaves
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Held:
    """Holds a LoraWeight / QTensor inside an ``nnx.Variable``; ``var[...]`` returns it."""

    w: Any

    def __getitem__(self, index: Any) -> Any:
        if index is not Ellipsis:
            raise TypeError("a LoRA/quantized NNX weight only supports var[...]")
        return self.w


jax.tree_util.register_dataclass(_Held, data_fields=["w"], meta_fields=[])


def _special(x: Any) -> bool:
    return isinstance(x, LoraWeight) or _is_qtensor(x)


def _nnx_promote(args: tuple, /, *, dtype: Any = None, inexact: bool = True) -> tuple:
    """``nnx.nn.dtypes.promote_dtype`` that lets LoraWeight / QTensor weights pass through."""
    from flax.nnx.nn import dtypes

    probes = [jnp.zeros((), x.dtype) if _special(x) else x for x in args]
    dt = dtypes.canonicalize_dtype(*probes, dtype=dtype, inexact=inexact)
    return tuple(x if x is None or _special(x) else jnp.asarray(x, dt) for x in args)


def _lora_einsum(eq: str, x: Array, w: Any, **kwargs: Any) -> Array:
    """``einsum(eq, x, W)`` where ``W`` may be a QTensor or a LoraWeight.

    The LoRA term factorizes the kernel along its first axis, ``W[k0, k...] = A[k0, r]
    B[r, k...]``, and is contracted x-with-A first, so it runs through ``[..., r]``.
    """
    kwargs = {k: v for k, v in kwargs.items() if k == "precision"}
    if not _special(w):
        return jnp.einsum(eq, x, w, **kwargs)
    ins, out = eq.replace(" ", "").split("->")
    lhs, rhs = ins.split(",")
    base = w.w if isinstance(w, LoraWeight) else w
    y = jnp.einsum(eq, x, _dense(base, x.dtype), **kwargs)
    if isinstance(w, LoraWeight):
        if "." in rhs:
            raise ValueError(f"LoRA einsum: the kernel spec {rhs!r} must not use '...'")
        r = next(c for c in "RZYXWVUTSQPONMLKJIHGFEDCBA" if c not in eq)
        eq3 = f"{lhs},{rhs[0]}{r},{r}{rhs[1:]}->{out}"
        xd = _dropout(x, w.dropout, w.key)
        lo = jnp.einsum(
            eq3, xd, w.a.astype(x.dtype), w.b.astype(x.dtype), optimize=[(0, 1), (0, 1)], **kwargs
        )
        y = y + w.scale * lo
    return y


def _nnx_dot_general(
    lhs: Array,
    rhs: Any,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **_: Any,
) -> Array:
    """``lax.dot_general`` for nnx.Linear / nnx.LinearGeneral routed through `_lora_einsum`."""
    if not _special(rhs):
        return jax.lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb:
        raise NotImplementedError("LoRA on nnx.LinearGeneral with batch axes is not supported")
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    ls = [next(letters) for _ in range(lhs.ndim)]
    rs = [None] * len(rhs.shape)
    for i, j in zip(lc, rc, strict=True):
        rs[j] = ls[i]
    rs = [c or next(letters) for c in rs]
    out = [c for i, c in enumerate(ls) if i not in lc] + [
        c for j, c in enumerate(rs) if j not in rc
    ]
    return _lora_einsum(
        f"{''.join(ls)},{''.join(rs)}->{''.join(out)}", lhs, rhs, precision=precision
    )


_LORA_EMBED: dict[str, type] = {}


def _lora_embed_cls() -> type:
    """A subclass of nnx.Embed whose lookup / attend go through `embed` / `attend`."""
    if "cls" not in _LORA_EMBED:
        from flax import nnx

        class LoraEmbed(nnx.Embed):
            def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
                return embed(inputs, self.embedding[...], dtype=self.dtype)

            def attend(self, query: Array, out_sharding: Any = None) -> Array:
                return attend(query, self.embedding[...])

        _LORA_EMBED["cls"] = LoraEmbed
    return _LORA_EMBED["cls"]


def _unflatten_tuples(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def nnx_params(model: Any) -> Params:
    """The pure ``Params`` dict (``nnx.Param`` values, string keys) of any Flax NNX model.

    Paths are the NNX attribute paths, e.g. ``blocks/0/attn/query/kernel``; use them with
    `LoraSpec` targets, `init`, ``quant.quantize_tree`` and `nnx_bind`.
    """
    from flax import nnx

    return _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def nnx_bind(
    model: Any, params: Params, adapters: Adapters | None = None, dropout_key: Array | None = None
) -> Any:
    """A copy of a user's NNX ``model`` running on ``params`` (+ LoRA ``adapters``).

    ``params`` has the layout of `nnx_params` (leaves Array or QTensor). Targeted leaves become
    `LoraWeight` views (`attach`). nnx.Linear / nnx.LinearGeneral / nnx.Einsum layers holding
    such a leaf get the module's own extension points set (``promote_dtype`` and
    ``dot_general`` / ``einsum_op``) so the projection runs the LoRA/QLoRA primitive; nnx.Embed
    layers become a subclass whose ``__call__`` / ``attend`` call `embed` / `attend`. The user's
    ``model`` object is never modified. Call it inside your jitted loss:
    ``nnx_bind(model, base, adapters, key)(x)``; gradients flow to ``params`` / ``adapters``.
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    tree = attach(params, adapters, dropout_key) if adapters else params
    flat = flatten_paths(tree)
    found = {"/".join(map(str, k)): k for k, _ in nnx.to_flat_state(state)}
    missing = sorted(set(flat) - set(found))
    if missing:
        raise ValueError(f"params paths not found in the NNX model: {missing[:3]}")
    pure = {found[p]: _Held(v) if _special(v) else v for p, v in flat.items()}
    nnx.replace_by_pure_dict(state, _unflatten_tuples(pure))
    m = nnx.merge(graphdef, state)  # a fresh copy we are free to modify
    for path, node in nnx.iter_graph(m):
        if not isinstance(node, nnx.Module):
            continue
        pfx = "/".join(map(str, path))
        name = "embedding" if isinstance(node, nnx.Embed) else "kernel"
        leaf = flat.get(f"{pfx}/{name}" if pfx else name)
        if leaf is None or not _special(leaf):
            continue
        if isinstance(node, nnx.Embed):
            object.__setattr__(node, "__class__", _lora_embed_cls())
        elif isinstance(node, (nnx.Linear, nnx.LinearGeneral)):
            node.promote_dtype = _nnx_promote
            node.dot_general = _nnx_dot_general
            if getattr(node, "dot_general_cls", None) is not None:
                node.dot_general_cls = None
        elif isinstance(node, nnx.Einsum):
            node.promote_dtype = _nnx_promote
            node.einsum_op = _lora_einsum
        else:
            raise ValueError(
                f"LoRA/quantized leaf at {pfx!r} is in an unsupported module {type(node).__name__}"
            )
    return m
