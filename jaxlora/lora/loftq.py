"""LoftQ initialization of QLoRA (Li et al. 2023, arXiv 2310.08659), while the model loads.

Plain QLoRA starts from ``Q = q(W)`` and ``B = 0``, so training begins at the quantization
error ``W - Q``. LoftQ chooses the quantized base and the adapters together, alternating
(the paper's Algorithm 1, ``A_0 B_0 = 0``) for ``t = 1..T``::

    Q_t = q(W - s A_{t-1} B_{t-1})            # quantize what the adapters do not hold
    A_t, B_t = top-r SVD of (W - Q_t) / s     # fit the adapters to the quantization residual

so that ``Q_T + s A_T B_T`` is closer to ``W`` than ``q(W)`` (rank r of the error is removed).
The SVD is split as PiSSA splits it, ``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) Vh_r``.

LoftQ needs the float ``W``, which exists only while a checkpoint is read: `load_loftq` runs
it inside the quantize-on-load hook of `jaxlora.io.load_model`, one layer's tensor at a time,
so the float model is never held whole (peak memory: the quantized model plus one layer's
float tensor and its SVD). Targets the ``[quant]`` rules leave in float are refused: LoftQ
is an initialization of quantized bases.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import quant
from jaxlora.lora.primitive import Adapters, LoraPair
from jaxlora.lora.spec import LoraSpec, leaf_geometry, resolve_targets
from jaxlora.paths import unflatten_paths

__all__ = ["loftq", "LoftQHook", "load_loftq"]

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("rank", "scale", "qtype", "block_size",
                                               "double_quant", "iters"))
def loftq(w: Array, *, rank: int, scale: float, qtype: str = "nf4", block_size: int = 64,
          double_quant: bool = True, iters: int = 1) -> tuple[Any, Array, Array]:
    """LoftQ's alternating quantization and rank-r SVD of one weight ``w [in, *out]``.

    Args:
      w: the float weight (one layer of a stacked leaf).
      rank, scale: the adapter's rank r and scale s (``Q + s A B`` approximates ``w``).
      qtype, block_size, double_quant: the quantization of the base (as `quant.quantize`).
      iters: T, the number of alternations (T = 1: quantize W, then fit the residual).

    Returns:
      ``(Q, a [in, r], b [r, *out])``: the QTensor base and float32 adapters.
    """
    w = w.astype(jnp.float32)
    d_in, out = w.shape[0], w.shape[1:]
    w2 = w.reshape(d_in, -1)  # [in, out]
    low = jnp.zeros_like(w2)  # s A B, zero before the first step
    for _ in range(iters):
        q = quant.quantize((w2 - low).reshape(w.shape), qtype, block_size, double_quant)
        resid = w2 - quant.dequantize(q, jnp.float32).reshape(d_in, -1)  # [in, out]
        u, s, vh = jnp.linalg.svd(resid, full_matrices=False)
        sr = jnp.sqrt(s[:rank] / scale)  # [r]
        a = u[:, :rank] * sr[None, :]  # [in, r]
        b = sr[:, None] * vh[:rank, :]  # [r, out]
        low = scale * (a @ b)
    return q, a, b.reshape(rank, *out)


class LoftQHook:
    """The quantize-on-load hook of `jaxlora.io.load_model` that applies LoftQ to the targets.

    Targeted tensors (per layer) get `loftq`; every other tensor goes through the plain
    rules hook (``fallback``). The adapters accumulate per layer and `adapters` stacks them.

    Args:
      shapes: ``path -> full leaf shape`` of the model (`jaxlora.models.param_shapes`).
      spec: the LoRA spec (targets, ranks, scales, ``loftq_iters``).
      rules: the `quant.QuantRules` of the base.
      fallback: the hook of ``rules`` for the other tensors (`jaxlora.io.rules_hook`).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], spec: LoraSpec,
                 rules: quant.QuantRules, fallback: Any) -> None:
        tree = unflatten_paths({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})
        self.targets = {p: leaf_geometry(p, tuple(shapes[p]), spec)
                        for p in resolve_targets(tree, spec)}
        for path, g in self.targets.items():
            if quant.select(rules, path, len(shapes[path])) is None or len(g.lead) > 1:
                raise ValueError(f"lora.init = 'loftq': target {path!r} is not quantized by the "
                                 f"[quant] rules (qtype {rules.qtype!r}); LoftQ initializes "
                                 "quantized layers only (exclude it or quantize it)")
        self.spec, self.rules, self.fallback = spec, rules, fallback
        self._pairs: dict[str, dict[int | None, tuple[Array, Array]]] = {}

    def __call__(self, path: str, arr: np.ndarray, layer: int | None) -> Any:
        g = self.targets.get(path)
        if g is None:
            return self.fallback(path, arr, layer)
        if bool(g.lead) != (layer is not None):
            raise ValueError(f"lora.init = 'loftq': {path!r} arrived {'un' if layer is None else ''}"
                             f"stacked, its adapter geometry is {g.lead}")
        if not np.isfinite(arr).all():
            raise ValueError(f"lora.init = 'loftq': {path!r} contains NaN or Inf")
        r = self.rules
        q, a, b = loftq(jnp.asarray(arr), rank=g.rank, scale=g.scale, qtype=r.qtype,
                        block_size=r.block_size, double_quant=r.double_quant,
                        iters=self.spec.loftq_iters)
        self._pairs.setdefault(path, {})[layer] = jax.block_until_ready((a, b))
        return q

    def adapters(self) -> Adapters:
        """The LoftQ adapters of every target, stacked over layers (``spec.dtype``)."""
        dtype = jnp.dtype(self.spec.dtype)
        out = {}
        for path, g in self.targets.items():
            per = self._pairs.get(path, {})
            layers = list(range(g.lead[0])) if g.lead else [None]
            if sorted(per, key=lambda i: -1 if i is None else i) != layers:
                raise ValueError(f"lora.init = 'loftq': {path!r} was not loaded (layers {sorted(per)})")
            a = [per[i][0] for i in layers]
            b = [per[i][1] for i in layers]
            a, b = (jnp.stack(a), jnp.stack(b)) if g.lead else (a[0], b[0])
            out[path] = LoraPair(a.astype(dtype), b.astype(dtype), scale=g.scale,
                                 dropout=float(self.spec.dropout))
        return out


def load_loftq(name_or_path: str | os.PathLike, rules: quant.QuantRules, spec: LoraSpec, *,
               dtype: Any = jnp.float32, seed: int = 0) -> tuple[Any, Adapters]:
    """`jaxlora.io.load_model` with LoftQ: ``(LoadedModel, adapters)``.

    The base of the returned model holds LoftQ's ``Q`` at the targets (plain ``q(W)``
    elsewhere); the adapters (DoRA magnitudes included for ``spec.method == "dora"``, from
    ``Q + s A B``) fit it, and ``Q + s A B`` approximates the checkpoint's ``W``.

    Raises:
      ValueError: a float base (``rules.qtype == "none"``), or a target the rules leave in
        float, named.
    """
    from jaxlora import io, models
    from jaxlora.lora.adapters import check_method, with_magnitudes

    if rules.qtype == "none":
        raise ValueError("lora.init = 'loftq' needs a quantized base; quant.qtype is 'none' "
                         "(set quant.qtype, e.g. 'nf4', or choose another lora.init)")
    shapes = models.param_shapes(io.model_config(name_or_path))
    hook = LoftQHook(shapes, spec, rules, io.rules_hook(rules, dtype))
    check_method(spec, list(hook.targets))
    loaded = io.load_model(name_or_path, quant=hook, dtype=dtype, seed=seed)
    pairs = with_magnitudes(loaded.params, hook.adapters(), spec)
    return loaded, unflatten_paths(pairs)
