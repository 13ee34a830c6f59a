"""Creating, merging and counting adapters: `init`, `init_pissa`, `merge`, `unmerge`, `summary`.

* `init` (LoRA, Hu et al. 2021, arXiv 2106.09685): A random, B = 0 (embedding tables swap the
  roles, as in PEFT), so ``A @ B = 0`` and the adapted model starts exactly at the base model.
  The scale is ``alpha / r`` or rsLoRA's ``alpha / sqrt(r)`` (arXiv 2312.03732), from
  `jaxlora.lora.spec.leaf_geometry`.
* `init_pissa` (PiSSA, Meng et al. 2024, arXiv 2404.02948) starts the adapters at the top-r
  singular directions of W and changes the base to the residual, so it has its own entry
  point returning ``(residual_base, adapters)``; `init` refuses it.
* DoRA (Liu et al. 2024, arXiv 2402.09353), ``LoraSpec.method = "dora"``: every pair also
  gets a magnitude ``m = ||W||_c`` (the column norms of the base, dequantized for a QTensor),
  so that with ``B = 0`` the adapted weight ``m * W / ||W||_c`` is the base exactly.
* `merge` / `unmerge` add / subtract ``s * A @ B`` in float32 for export or fast inference;
  for DoRA ``merge`` forms ``m * (W + s A B) / ||W + s A B||_c`` and `unmerge` needs the
  column norms of the unmerged weight (`dora_norms`), which the merged weight no longer holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import quant
from jaxlora.lora.primitive import (
    Adapters,
    LoraPair,
    Params,
    check_fit,
    column_norm,
    dense,
    dora_norm,
)
from jaxlora.lora.spec import LoraSpec, leaf_geometry, resolve_targets
from jaxlora.paths import flatten_paths, replace_paths, unflatten_paths

__all__ = ["init", "init_pissa", "merge", "unmerge", "dora_norms", "Summary", "summary"]

Array = jax.Array


def _path_key(key: Array, path: str) -> Array:
    """A key derived from the path string, so adding a target does not reshuffle the others."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init(key: Array, base: Params, spec: LoraSpec) -> Adapters:
    """Create the adapters for ``base`` (Array or QTensor leaves) according to ``spec``.

    Each targeted leaf ``[*lead, in, *out]`` gets ``LoraPair(a [*lead, in, r],
    b [*lead, r, *out])``. Linear kernels: A kaiming-uniform or gaussian, B = 0; embedding
    tables (leaf named ``embedding``): A = 0, B ~ N(0, 1). Either way ``A @ B = 0`` at init,
    so the adapted model starts exactly at the base model.

    For ``spec.init == "pissa"`` the base must change too: call `init_pissa`; LoftQ
    (``"loftq"``) chooses the quantized base and the adapters together while the checkpoint
    is read (`jaxlora.lora.loftq.load_loftq`). With ``spec.method == "dora"`` each pair gets
    DoRA's magnitude ``m = ||W||_c`` as well (see the module docstring).
    """
    if spec.init in ("pissa", "loftq"):
        how = "init_pissa(base, spec)" if spec.init == "pissa" else "lora.loftq.load_loftq"
        raise ValueError(f"LoraSpec.init={spec.init!r} replaces the base weights: use {how}")
    flat = flatten_paths(base)
    paths = resolve_targets(base, spec)
    check_method(spec, paths)
    geometry = {path: leaf_geometry(path, tuple(flat[path].shape), spec) for path in paths}
    shapes = tuple((p, g.lead, g.d_in, g.out, g.rank) for p, g in geometry.items())
    arrays = _init_arrays(key, shapes, spec.init, spec.dtype)
    pairs = {
        p: LoraPair(a=a, b=b, scale=geometry[p].scale, dropout=float(spec.dropout))
        for p, (a, b) in arrays.items()
    }
    return unflatten_paths(with_magnitudes(base, pairs, spec))


def check_method(spec: LoraSpec, paths: list[str]) -> None:
    """Refuse DoRA on an embedding table (ValueError naming the path): its rows are looked
    up, not projected, so there is no output column to normalize (PEFT refuses it too)."""
    if spec.method != "dora":
        return
    for path in paths:
        if path.split("/")[-1] == "embedding":
            raise ValueError(f"lora.method = 'dora': target {path!r} is an embedding table; DoRA "
                             "adapts linear kernels only (exclude it from lora.targets)")


def with_magnitudes(base: Params, pairs: dict[str, LoraPair], spec: LoraSpec) -> dict[str, LoraPair]:
    """``pairs`` (path -> pair) with DoRA's magnitude ``m = ||W + s A B||_c`` when
    ``spec.method == "dora"`` (``||W||_c`` for a zero B), else unchanged."""
    if spec.method != "dora":
        return pairs
    flat = flatten_paths(base)
    norms = _norms({p: flat[p] for p in pairs}, pairs)
    return {p: dataclasses.replace(pair, m=norms[p].astype(spec.dtype)) for p, pair in pairs.items()}


@jax.jit
def _norms(ws: dict[str, Any], pairs: dict[str, LoraPair]) -> dict[str, Array]:
    """``||W + s A B||_c`` per path, ``[*lead, *out]`` float32 (QTensors dequantized): the
    forward's `dora_norm`, mapped over the stacked layers one layer at a time."""
    out = {}
    for p, w in ws.items():
        pair = pairs[p]
        lead = pair.a.shape[:-2]
        if not lead:
            out[p] = dora_norm(w, pair.a, pair.b, pair.scale)
            continue
        k = len(lead)
        layers = jax.tree.map(lambda t, k=k: t.reshape(-1, *t.shape[k:]),
                              (w, pair.a, pair.b))  # [prod(lead), ...]
        n = jax.lax.map(lambda t, s=pair.scale: dora_norm(*t, s), layers)  # [prod(lead), *out]
        out[p] = n.reshape(*lead, *n.shape[1:])
    return out


def _plain_delta(w: Any, pair: LoraPair) -> Array:
    """``W + s A B`` in float32, ``[*lead, in, *out]``."""
    return dense(w, jnp.float32) + _delta(pair)


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
        kernel=like.kernel,
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
    paths = resolve_targets(base, spec)
    check_method(spec, paths)
    for path in paths:
        w = flat[path]
        lead, d_in, d_out, r, scale = leaf_geometry(path, tuple(w.shape), spec)
        w32 = dense(w, jnp.float32).reshape(*lead, d_in, -1)  # [*lead, in, out]
        u, s, vh = jnp.linalg.svd(w32, full_matrices=False)
        sr = jnp.sqrt(s[..., :r] / scale)  # [*lead, r]
        a = u[..., :, :r] * sr[..., None, :]  # [*lead, in, r]
        b = sr[..., :, None] * vh[..., :r, :]  # [*lead, r, out]
        resid = (w32 - scale * (a @ b)).reshape(w.shape)
        new_base[path] = (
            _requantize_like(resid, w) if isinstance(w, quant.QTensor) else resid.astype(w.dtype)
        )
        b = b.reshape(*lead, r, *d_out)
        out[path] = LoraPair(
            a.astype(dtype), b.astype(dtype), scale=scale, dropout=float(spec.dropout)
        )
    resid = replace_paths(base, new_base)
    return resid, unflatten_paths(with_magnitudes(resid, out, spec))


# --------------------------------------------------------------------------------------------
# merge / unmerge / summary
# --------------------------------------------------------------------------------------------


def _delta(pair: LoraPair) -> Array:
    """``s * A @ B`` in float32, ``[*lead, in, *out]``, for `merge` / `unmerge`."""
    a = pair.a.astype(jnp.float32)
    b = pair.b.astype(jnp.float32)
    n = a.ndim - 2
    b2 = b.reshape(*b.shape[: n + 1], -1)  # [*lead, r, out]
    return (pair.scale * (a @ b2)).reshape(*a.shape[:-1], *b.shape[n + 1 :])


def merge(base: Params, adapters: Adapters) -> Params:
    """``W + s * A @ B`` at every adapted leaf: a float tree for export / fast inference.

    DoRA leaves become ``m * (W + s A B) / ||W + s A B||_c`` (the weight DoRA's forward
    applies). Adapted QTensor leaves are dequantized, summed in float32 and cast to their
    original dtype (they are *not* re-quantized, which would add rounding error; see
    peft#1043). Leaves without an adapter are returned unchanged.
    """
    check_fit(base, adapters)
    flat, flat_ad = flatten_paths(base), flatten_paths(adapters)
    return replace_paths(base, _merge_leaves({p: flat[p] for p in flat_ad}, flat_ad))


def dora_norms(base: Params, adapters: Adapters) -> dict[str, Array]:
    """``{path: ||W + s A B||_c}`` (``[*lead, *out]``, float32) of every DoRA leaf: what
    `unmerge` needs to undo a DoRA merge (take it from the base before merging)."""
    check_fit(base, adapters)
    flat, flat_ad = flatten_paths(base), flatten_paths(adapters)
    dora = {p: pair for p, pair in flat_ad.items() if pair.m is not None}
    return _norms({p: flat[p] for p in dora}, dora)


def unmerge(merged: Params, adapters: Adapters, norms: dict[str, Array] | None = None) -> Params:
    """Inverse of `merge` for float bases: ``W = W_merged - s * A @ B`` (up to float
    rounding); for DoRA leaves ``W = W_merged * norm / m - s A B`` with ``norms`` from
    `dora_norms` of the unmerged base (the merged weight's own column norms are ``|m|``)."""
    check_fit(merged, adapters)
    flat, flat_ad = flatten_paths(merged), flatten_paths(adapters)
    norms = norms or {}
    missing = [p for p, pair in flat_ad.items() if pair.m is not None and p not in norms]
    if missing:
        raise ValueError(f"unmerge: DoRA leaf {missing[0]!r} needs its column norms "
                         "(norms=lora.dora_norms(base, adapters), taken before merging)")
    return replace_paths(merged, _unmerge_leaves({p: flat[p] for p in flat_ad}, flat_ad, norms))


@jax.jit
def _merge_leaves(ws: dict[str, Any], pairs: dict[str, LoraPair]) -> dict:
    """``W + s A B`` (DoRA: times ``m / ||W + s A B||_c``) per path, in float32, cast back
    to each base dtype."""
    out = {}
    for p, w in ws.items():
        pair, v = pairs[p], _plain_delta(w, pairs[p])  # [*lead, in, *out]
        if pair.m is not None:
            n_lead = pair.a.ndim - 2
            v = v * jnp.expand_dims(pair.m.astype(jnp.float32) / column_norm(v, n_lead), n_lead)
        out[p] = v.astype(w.dtype)
    return out


@jax.jit
def _unmerge_leaves(ws: dict[str, Any], pairs: dict[str, LoraPair], norms: dict[str, Array]) -> dict:
    """`_merge_leaves` undone, given the DoRA leaves' column norms before the merge."""
    out = {}
    for p, w in ws.items():
        pair, v = pairs[p], dense(w, jnp.float32)
        if pair.m is not None:
            n_lead = pair.a.ndim - 2
            v = v * jnp.expand_dims(norms[p] / pair.m.astype(jnp.float32), n_lead)
        out[p] = (v - _delta(pair)).astype(w.dtype)
    return out


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
