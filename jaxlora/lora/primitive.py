"""The LoRA leaves and the one projection primitive that applies them.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a weight ``W [in, *out]`` and learns
``delta W = s * A @ B`` with ``A [in, r]``, ``B [r, *out]``. Model code calls only `linear`
(``x [..., in] . W``), `einsum` (any einsum equation with the kernel as second operand, for
Flax NNX layers), `embed` and `attend` on whatever leaf it holds: a ``jax.Array``, a
``quant.QTensor`` (dequantized to the compute dtype inside the jitted program) or the
`LoraWeight` view that `attach` puts at a targeted leaf.

What each path forms (the memory promises of QLoRA, arXiv 2305.14314):

* Without dropout the adapter folds into the weight: ``x . (W + s A B)``, one contraction
  forward and one for the input gradient. This *does* form ``W + s A B`` at the weight's size,
  as a per-call temporary (the dequantized weight is one already), under a custom VJP whose
  residuals are ``x``, ``x . A`` and the base leaf as given (the packed codes of a QTensor):
  the backward rebuilds ``W + s A B`` instead of keeping a dense float weight, and forms a
  weight gradient only when a float base is itself differentiated (symbolic zeros tell).
* With dropout the low-rank path runs apart, through ``[..., r]``, and never forms ``A @ B``;
  the base contraction of a QTensor is rematerialized (dequantized again in the backward).
* A bare QTensor base is the same rematerialized contraction, or, where its ``kernel`` mode
  selects it (`jaxlora.kernels.choose`), the fused Pallas dequantize-matmul, whose custom VJP
  decodes the codes tile by tile again for ``dx``; a `LoraWeight` over such a base is not
  folded (its adapter runs apart, through ``[..., r]``).

Either way the adapter gradients come from rank-``r`` contractions only: no ``[in, out]``
weight gradient is formed unless the base itself is differentiated.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import custom_derivatives

from jaxlora import kernels, quant
from jaxlora.paths import flatten_paths, replace_paths

__all__ = [
    "Params",
    "Adapters",
    "LoraPair",
    "LoraWeight",
    "dense",
    "linear",
    "einsum",
    "register_linear",
    "embed",
    "attend",
    "check_fit",
    "attach",
    "column_norm",
    "dora_norm",
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
      m: ``None`` (LoRA) or DoRA's magnitude ``[*lead, *out]``, one per output column (PEFT's
        ``lora_magnitude_vector``); trained with ``a`` and ``b``.
    """

    a: Array
    b: Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    m: Array | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])


jax.tree_util.register_dataclass(
    LoraPair, data_fields=["a", "b", "m"], meta_fields=["scale", "dropout"]
)


@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A base weight with its adapter attached: what `attach` puts at a targeted leaf.

    Attributes:
      w: base ``[*lead, in, *out]``, a ``jax.Array`` or a ``quant.QTensor``.
      a: ``[*lead, in, r]``; b: ``[*lead, r, *out]``.
      key: ``None`` (no dropout: inference) or a PRNG key per stacked layer, ``[*lead, 2]``
        uint32 or a typed key array ``[*lead]``, so that ``lax.scan`` slices it with the rest.
      scale, dropout: static, as in `LoraPair`.
      m: ``None`` (LoRA) or DoRA's magnitude ``[*lead, *out]``.
    """

    w: Any
    a: Array
    b: Array
    key: Array | None = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    m: Array | None = None

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
    LoraWeight, data_fields=["w", "a", "b", "key", "m"], meta_fields=["scale", "dropout"]
)


def dense(w: Any, dtype: Any) -> Array:
    """The base weight as a dense array of ``dtype`` (dequantized inside jit for QTensor)."""
    if isinstance(w, quant.QTensor):
        return quant.dequantize(w, dtype)
    return jnp.asarray(w).astype(dtype)


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout on ``x``; identity without a key (inference) or with rate 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _contract1(x: Array, w: Array) -> Array:
    """``x [..., in] . w [in, *out] -> [..., *out]``."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


# --------------------------------------------------------------------------------------------
# Contractions: how x meets the kernel (linear, or an einsum equation)
# --------------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class _Linear:
    """``x [..., in] . w [in, *out]``, the contraction of `linear` (static, hashable)."""

    def apply(self, x: Array, w: Array) -> Array:
        return _contract1(x, w)

    def down(self, x: Array, a: Array) -> Array:
        """``x . A``: ``[..., in] x [in, r] -> [..., r]``."""
        return _contract1(x, a)

    def low_rank(self, x: Array, a: Array, b: Array, scale: float) -> Array:
        """``s * (x . A) . B`` through ``[..., r]`` (the dropout path)."""
        return _low_rank(x, a, b, scale)

    def grads(self, scale, x, xa, w_eff, a, b, dy, with_w):
        """``(dx, dw or None, da, db)`` of ``x . w_eff`` with ``w_eff = W + s A B``."""
        # Token-flattened 2-D operands, for the layouts reason given in `_low_rank_bwd`.
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        b2 = b.reshape(b.shape[0], -1)  # [r, out]
        dy2 = dy.reshape(x2.shape[0], -1)  # [N, out]
        w2 = w_eff.reshape(x2.shape[1], -1)  # [in, out]
        dx = (dy2 @ w2.T).reshape(x.shape)
        da = x2.T @ (scale * (dy2 @ b2.T))  # [in, r]
        db = scale * (xa.reshape(-1, xa.shape[-1]).T @ dy2)  # [r, out]
        dw = (x2.T @ dy2) if with_w else None  # [in, out]
        return dx, dw, da, db.reshape(b.shape)


_LINEAR = _Linear()


@functools.cache
def _low_rank_eqs(eq: str) -> tuple[str, str]:
    """The two einsum steps ``(x . A, (x . A) . B)`` of the low-rank part of ``einsum(eq)``.

    An einsum kernel ``W[k0, k...]`` is factorized along its first axis, ``A[k0, r]
    B[r, k...]`` (``k0`` is LoRA's ``in``, as in `LoraSpec` geometry), so ``x . W`` becomes
    ``(x . A) . B`` through an intermediate that holds ``r`` in place of ``k0``.
    """
    ins, out = eq.replace(" ", "").split("->")
    lhs, rhs = ins.split(",")
    if "." in rhs:
        raise ValueError(f"LoRA einsum: the kernel spec {rhs!r} must not use '...'")
    r = next(c for c in "RZYXWVUTSQPONMLKJIHGFEDCBA" if c not in eq)
    later = set(out + rhs[1:])  # what the second step (or the output) still needs
    tokens = re.findall(r"\.\.\.|[^.]", lhs) + [rhs[0]]
    xa = "".join(dict.fromkeys(t for t in tokens if t == "..." or t in later)) + r
    return f"{lhs},{rhs[0]}{r}->{xa}", f"{xa},{r}{rhs[1:]}->{out}"


@dataclasses.dataclass(frozen=True)
class _Einsum:
    """``einsum(eq, x, w)`` with the kernel second, as nnx.Einsum / nnx.Linear run it."""

    eq: str
    precision: Any = None

    def _ein(self, eq: str, x: Array, y: Array) -> Array:
        return jnp.einsum(eq, x, y, precision=self.precision)

    def apply(self, x: Array, w: Array) -> Array:
        return self._ein(self.eq, x, w)

    def down(self, x: Array, a: Array) -> Array:
        return self._ein(_low_rank_eqs(self.eq)[0], x, a)

    def up(self, xa: Array, b: Array) -> Array:
        return self._ein(_low_rank_eqs(self.eq)[1], xa, b)

    def low_rank(self, x: Array, a: Array, b: Array, scale: float) -> Array:
        return scale * self.up(self.down(x, a), b)

    def grads(self, scale, x, xa, w_eff, a, b, dy, with_w):
        """As `_Linear.grads`, each cotangent the transpose of one forward contraction."""

        def t(f: Callable[[Array], Array], primal: Array, ct: Array) -> Array:
            return jax.linear_transpose(f, primal)(ct)[0]

        dx = t(lambda x_: self.apply(x_, w_eff), x, dy)
        dxa = scale * t(lambda h: self.up(h, b), xa, dy)  # shaped like x . A
        da = t(lambda a_: self.down(x, a_), a, dxa)
        db = scale * t(lambda b_: self.up(xa, b_), b, dy)
        dw = t(lambda w_: self.apply(x, w_), w_eff, dy) if with_w else None
        return dx, dw, da, db


# --------------------------------------------------------------------------------------------
# The primitive
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _merged_lora(x: Array, w: Any, a: Array, b: Array, scale: float, how: Any) -> Array:
    """``x . (W + s A B)`` for ``w [in, *out]`` (array or QTensor), ``a [in, r]``, ``b [r, *out]``.

    Without dropout the low-rank path folds into the weight: one contraction forward and one
    for the input gradient instead of two skinny ones and an add over ``[..., out]`` each way.
    ``W + s A B`` is a per-call temporary (the dequantized weight is one already); the backward
    rebuilds it from the base leaf (the packed codes of a QTensor) rather than keeping it.
    ``how`` is the contraction (`_LINEAR` or an `_Einsum`).
    """
    return how.apply(x, _effective(w, a, b, scale, x.dtype))


@jax.named_scope("effective_weight")
def _effective(w: Any, a: Array, b: Array, scale: float, dtype: Any) -> Array:
    """``W + s A B``, ``[in, *out]`` in ``dtype``: formed at the weight's size."""
    return dense(w, dtype) + scale * _contract1(a, b)


def _merged_lora_fwd(x, w, a, b, scale, how):
    # symbolic_zeros: each argument leaf arrives as CustomVJPPrimal(value, perturbed), which
    # tells whether a float base weight is being differentiated (full fine-tuning through a
    # LoraWeight); only then does the backward form the weight gradient.
    x, a, b = x.value, a.value, b.value
    primal = lambda t: isinstance(t, custom_derivatives.CustomVJPPrimal)  # noqa: E731
    qtensor = isinstance(w, quant.QTensor)
    w_grad = not qtensor and any(p.perturbed for p in jax.tree.leaves(w, is_leaf=primal))
    w = jax.tree.map(lambda p: p.value, w, is_leaf=primal)
    # The last residual is the flag: None, or a second (no-copy) reference to w.
    return _merged_lora(x, w, a, b, scale, how), (x, how.down(x, a), w, a, b, w if w_grad else None)


def _merged_lora_bwd(scale, how, res, dy):
    x, xa, w, a, b, w_ref = res
    if isinstance(dy, custom_derivatives.SymbolicZero):
        return None, None, None, None
    w_eff = _effective(w, a, b, scale, x.dtype)  # rebuilt, not kept
    dx, dw, da, db = how.grads(scale, x, xa, w_eff, a, b, dy, w_ref is not None)
    dw = None if dw is None else dw.reshape(w.shape).astype(w.dtype)
    return dx, dw, da, db


_merged_lora.defvjp(_merged_lora_fwd, _merged_lora_bwd, symbolic_zeros=True)


def _dequant_contract(how: Any, x: Array, q: Any) -> Array:
    return how.apply(x, quant.dequantize(q, x.dtype))


# Rematerialized so that the backward pass dequantizes the codes again instead of keeping the
# float weight as a residual: otherwise every layer's dense W would be saved for the input
# gradient, a full-precision copy of the model during training.
_dequant_contract_remat = jax.checkpoint(_dequant_contract, static_argnums=(0,))


def _kernel_tiles(how: Any, x: Array, w: Any) -> Any:
    """The fused kernel's tiles when ``x . w`` runs through it (`jaxlora.kernels.choose`)."""
    if not isinstance(w, quant.QTensor) or how is not _LINEAR:
        return None
    return kernels.choose(w, x, functools.partial(_dequant_contract_remat, _LINEAR))


def _base(how: Any, x: Array, w: Any) -> Array:
    """``x . W`` for a float or QTensor base weight."""
    if isinstance(w, quant.QTensor):
        tiles = _kernel_tiles(how, x, w)
        if tiles is not None:  # decodes the codes per tile, forward and dx (no dense W)
            return kernels.apply(x, w, tiles)
        return _dequant_contract_remat(how, x, w)
    return how.apply(x, jnp.asarray(w).astype(x.dtype))


def column_norm(w_eff: Array, n_lead: int = 0) -> Array:
    """DoRA's ``||W'||_c``: the L2 norm of each output column of ``w_eff [*lead, in, *out]``
    over its ``in`` axis, ``[*lead, *out]`` in float32 (PEFT's ``norm(weight, dim=1)`` of the
    torch ``[out, in]`` weight)."""
    return jnp.sqrt(jnp.sum(jnp.square(w_eff.astype(jnp.float32)), axis=n_lead))


def dora_norm(w: Any, a: Array, b: Array, scale: float) -> Array:
    """``||W + s A B||_c`` of one unstacked leaf (``w [in, *out]``, Array or QTensor), in
    float32: the one function DoRA's forward and its init both call, so that a fresh
    magnitude equals the forward's norm bit for bit and the initial output is the base's."""
    w_eff = _effective(w, a.astype(jnp.float32), b.astype(jnp.float32), scale, jnp.float32)
    return jax.lax.optimization_barrier(column_norm(jax.lax.optimization_barrier(w_eff)))


def _dora(how: Any, x: Array, w: LoraWeight, a: Array, b: Array) -> Array:
    """DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5): ``y = (m / ||W'||_c) * (x . W')`` with
    ``W' = W + s A B``, the norm detached from the gradient as the paper's section 4.3 suggests
    (and PEFT does), so it costs no ``[in, out]`` residual: it is a ``[*out]`` constant, and
    ``x . W'`` is the folded LoRA primitive (W rebuilt from the codes in its backward).

    With dropout (PEFT's formula): ``y = x . W + (g - 1) (d . W) + g s (d . A) B`` with
    ``d = dropout(x)``, ``g = m / ||W'||_c``, computed as ``(x - d) . W + g (d . W')``.
    """
    norm = jax.lax.stop_gradient(dora_norm(w.w, w.a, w.b, w.scale))  # [*out]
    g = (w.m.astype(jnp.float32) / norm).astype(x.dtype)  # [*out]
    if w.key is None or w.dropout <= 0.0:
        return g * _merged_lora(x, w.w, a, b, w.scale, how)  # [..., *out]
    d = _dropout(x, w.dropout, w.key)
    return _base(how, x - d, w.w) + g * _merged_lora(d, w.w, a, b, w.scale, how)


def _project(how: Any, x: Array, w: Any) -> Array:
    """``x . W (+ s * (dropout(x) . A) . B)`` for an Array, QTensor or `LoraWeight` leaf
    (DoRA's `_dora` when the leaf has a magnitude)."""
    if not isinstance(w, LoraWeight):
        return _base(how, x, w)
    a, b = w.a.astype(x.dtype), w.b.astype(x.dtype)
    if w.m is not None:
        return _dora(how, x, w, a, b)
    # A kernel base is never folded: W + sAB would be a dense weight again.
    if (w.key is None or w.dropout <= 0.0) and _kernel_tiles(how, x, w.w) is None:
        return _merged_lora(x, w.w, a, b, w.scale, how)
    y = _base(how, x, w.w)  # [..., *out]
    return y + how.low_rank(_dropout(x, w.dropout, w.key), a, b, w.scale)


_LINEAR_RULES: dict[type, Callable[..., Array]] = {}


def register_linear(cls: type, fn: Callable[..., Array]) -> None:
    """Extension point: `linear` sends leaves of exactly type ``cls`` to ``fn(x, w, bias)``.

    For weight views defined outside this module (e.g. ``jaxlora.multi.MultiLoraWeight``,
    several adapters chosen per batch row), so model code still calls only `linear`.
    """
    if cls in (LoraWeight,) or not isinstance(cls, type):
        raise ValueError(f"register_linear: cannot register {cls!r}")
    _LINEAR_RULES[cls] = fn


@jax.named_scope("linear")
def linear(x: Array, w: Any, bias: Array | None = None) -> Array:
    """``y = x @ W (+ s * (dropout(x) @ A) @ B) (+ bias)``: the one projection primitive.

    Args:
      x: ``[..., in]``; its dtype is the compute dtype.
      w: ``[in, *out]`` as a ``jax.Array``, a ``quant.QTensor`` (dequantized to ``x.dtype``
        inside the program) or a `LoraWeight` (with ``a [in, r]``, ``b [r, *out]``).
      bias: optional ``[*out]``.

    Returns:
      ``[..., *out]`` in ``x.dtype``. Without dropout this is ``x @ (W + s A B)``, which forms
      ``W + s A B`` as a temporary but keeps only ``x``, ``x @ A`` and the (packed) base leaf
      for the backward; with dropout the LoRA path goes through ``[..., r]`` and ``A @ B`` is
      not formed.
    """
    rule = _LINEAR_RULES.get(type(w))
    if rule is not None:
        return rule(x, w, bias)
    y = _project(_LINEAR, x, w)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


@jax.named_scope("linear")
def einsum(eq: str, x: Array, w: Any, precision: Any = None) -> Array:
    """``jnp.einsum(eq, x, W)`` for an Array, QTensor or `LoraWeight` kernel ``W``: `linear`'s twin.

    The same primitive as `linear` (folded custom VJP without dropout, rematerialized
    dequantization of a QTensor), for any two-operand equation with the kernel second, such as
    nnx.Einsum's ``"bthd,hdo->bto"``. The LoRA update of a kernel ``W[k0, k...]`` is ``A[k0, r]
    B[r, k...]`` (its first axis is LoRA's ``in``); with LoRA the kernel spec must not use
    ``...``.
    """
    eq = eq.replace(" ", "")
    if isinstance(w, LoraWeight):
        _low_rank_eqs(eq)  # refuses a kernel spec it cannot factorize, whichever path runs
        if w.m is not None:
            _check_dora_eq(eq)
    return _project(_Einsum(eq, precision), x, w)


def _check_dora_eq(eq: str) -> None:
    """DoRA scales the output by ``[*out]``: the kernel's output axes must end the output."""
    ins, out = eq.split("->")
    kernel_out = ins.split(",")[1][1:]
    if not out.endswith(kernel_out) or any(c in out[: len(out) - len(kernel_out)] for c in kernel_out):
        raise ValueError(f"DoRA einsum {eq!r}: the kernel's output axes {kernel_out!r} must be "
                         "the last axes of the output, in order")


@jax.named_scope("embed")
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
    y = jnp.take(dense(base, dtype), ids, axis=0)  # [..., d]
    if isinstance(table, LoraWeight):
        h = jnp.take(table.a.astype(dtype), ids, axis=0)  # [..., r]
        y = y + table.scale * _contract1(h, table.b.astype(dtype))
    return y


@jax.named_scope("lm_head")
def attend(x: Array, table: Any) -> Array:
    """Tied LM head ``x @ table.T``: ``[..., d] x [vocab, d] -> [..., vocab]``.

    With a `LoraWeight` table (``a [vocab, r]``, ``b [r, d]``) this is
    ``x @ W.T + s * (x @ B.T) @ A.T``, the LoRA part through ``[..., r]`` only.
    """
    base = table.w if isinstance(table, LoraWeight) else table
    w = dense(base, x.dtype)  # [vocab, d]
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))  # [..., vocab]
    if isinstance(table, LoraWeight):
        h = jax.lax.dot_general(x, table.b.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
        y = y + table.scale * jax.lax.dot_general(
            h, table.a.astype(x.dtype), (((h.ndim - 1,), (1,)), ((), ()))
        )
    return y


# --------------------------------------------------------------------------------------------
# attach / check_fit
# --------------------------------------------------------------------------------------------


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
        if pair.m is not None:
            want = (*wshape[:n_lead], *wshape[n_lead + 1 :])
            if path.split("/")[-1] == "embedding":
                raise ValueError(f"DoRA adapter at {path!r}: an embedding table (DoRA adapts "
                                 "linear kernels only)")
            if tuple(pair.m.shape) != want:
                raise ValueError(f"DoRA adapter at {path!r}: magnitude {tuple(pair.m.shape)}, "
                                 f"expected [*lead, *out] = {want} for base {wshape}")


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
            lead = tuple(pair.a.shape[:-2])
            key = jax.random.split(leaf_keys[i], lead) if lead else leaf_keys[i]
        new[path] = LoraWeight(w=flat_base[path], a=pair.a, b=pair.b, key=key, scale=pair.scale,
                               dropout=pair.dropout, m=pair.m)
    return replace_paths(base, new)
