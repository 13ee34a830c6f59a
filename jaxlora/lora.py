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
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Params",
    "Adapters",
    "LoraPair",
    "LoraWeight",
    "attach",
    "linear",
    "embed",
    "attend",
    "check_fit",
    "flatten_paths",
    "unflatten_paths",
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
# Quantized bases (jaxlora.quant is imported lazily so this module stands on its own)
# --------------------------------------------------------------------------------------------


def _quant():
    try:
        from jaxlora import quant
    except ImportError:  # pragma: no cover - quant.py not present yet
        return None
    return quant


def _is_qtensor(x: Any) -> bool:
    q = _quant()
    return q is not None and isinstance(x, q.QTensor)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (LoraPair, LoraWeight)) or _is_qtensor(x)


def _dense(w: Any, dtype: Any) -> Array:
    """The base weight as a dense array of ``dtype`` (dequantized inside jit for QTensor)."""
    if _is_qtensor(w):
        return _quant().dequantize(w, dtype)
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
    if isinstance(w, LoraWeight):
        y = _contract1(x, _dense(w.w, x.dtype))  # [..., *out]
        h = _contract1(_dropout(x, w.dropout, w.key), w.a.astype(x.dtype))  # [..., r]
        y = y + w.scale * _contract1(h, w.b.astype(x.dtype))  # [..., *out]
    else:
        y = _contract1(x, _dense(w, x.dtype))
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


def _iter_paths(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k in tree:
        v = tree[k]
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _iter_paths(v, p)
        elif v is not None:
            yield p, v


def flatten_paths(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": x}} -> {"a/b": x}``; QTensor / LoraPair / LoraWeight are leaves."""
    return dict(_iter_paths(tree))


def unflatten_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_paths`."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, last = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    return out


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
