"""Several LoRA adapters on one (quantized) base, chosen per batch row.

Serving many fine-tunes of one base (S-LoRA, Sheng et al. 2023, arXiv 2311.03285; Punica,
Chen et al. 2023, arXiv 2310.18547): keep one copy of the base, stack the adapters, and let
every row ``i`` of a batch pick adapter ``ids[i]``:

    y_i = x_i @ W + s_{ids[i]} * (x_i @ A_{ids[i]}) @ B_{ids[i]}

The base matmul ``x @ W`` runs once for the whole batch (a QTensor base is dequantized once);
only the low-rank path is per row, through gathered ``A [B, in, r]`` / ``B [B, r, out]``.
Switching adapters is just a different ``ids`` array: same compiled program, base untouched.

Adapters of different ranks are zero-padded to the largest rank (zero columns of A and rows
of B add nothing) and their scales kept per adapter; an adapter that does not target a leaf
gets zeros there. ``ids[i] = -1`` selects the plain base model for row ``i``.

DoRA adapters (`lora.LoraPair.m`) stack too, for `attach_member` (every row through one
adapter): their pairs are ``(a, b, m)``. Every adapter of such a leaf must be DoRA (an absent
one would need the base's norms as its magnitude), and the per-row path refuses them.

How it plugs into the model: `attach_multi` puts a `MultiLoraWeight` at each adapted leaf and
the model code calls ``lora.linear`` on it as on any leaf; this module registers
`multi_linear` for that type with ``lora.register_linear``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import lora
from jaxlora.paths import replace_paths

__all__ = [
    "StackedLoraPair",
    "MultiLoraWeight",
    "stack_adapters",
    "attach_multi",
    "member_pairs",
    "attach_member",
    "uniform_dropout",
    "put_member",
    "padded_pairs",
    "unpad",
    "multi_linear",
    "forward",
    "generate_tokens",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StackedLoraPair:
    """N adapters of one base leaf, stacked after the leading (layer) axes.

    Attributes:
      a: ``[*lead, N, in, r_max]``; b: ``[*lead, N, r_max, *out]``.
      scales: static, one per adapter (0.0 where an adapter does not target this leaf).
      dropouts: static, each adapter's dropout rate (used only when a key is attached).
      m: None, or the DoRA magnitudes ``[*lead, N, *out]`` (every adapter of the leaf DoRA).
    """

    a: Array
    b: Array
    scales: tuple[float, ...] = dataclasses.field(metadata=dict(static=True))
    dropouts: tuple[float, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    m: Array | None = None

    @property
    def num_adapters(self) -> int:
        return len(self.scales)


jax.tree_util.register_dataclass(
    StackedLoraPair, data_fields=["a", "b", "m"], meta_fields=["scales", "dropouts"]
)


@dataclasses.dataclass(frozen=True)
class MultiLoraWeight:
    """A base weight with N stacked adapters and the per-row choice (what `attach_multi` puts).

    Attributes:
      w: base ``[*lead, in, *out]`` (Array or QTensor).
      a: ``[*lead, N, in, r]``; b: ``[*lead, N, r, *out]``.
      ids: ``[*lead, B]`` int32: adapter of each batch row (-1 = none); repeated over the
        leading axes so that ``lax.scan`` slices it together with the weights.
      key: dropout keys ``[*lead, 2]`` (training), or None (no dropout).
      scales: static ``(s_0, ..., s_{N-1})``; dropouts: static rates, one per adapter.
    """

    w: Any
    a: Array
    b: Array
    ids: Array
    scales: tuple[float, ...] = dataclasses.field(metadata=dict(static=True))
    key: Array | None = None
    dropouts: tuple[float, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self) -> Any:
        return self.w.dtype


jax.tree_util.register_dataclass(
    MultiLoraWeight, data_fields=["w", "a", "b", "ids", "key"], meta_fields=["scales", "dropouts"]
)


def stack_adapters(adapters: Sequence[lora.Adapters]) -> lora.Adapters:
    """Stack N adapter trees (same base) into one tree of `StackedLoraPair` leaves.

    Args:
      adapters: N >= 1 Adapters trees; they may target different leaves and use different
        ranks and scales. Only linear kernels are supported (no ``embedding`` leaves).

    Returns:
      A nested dict over the union of the targeted paths.

    Raises:
      ValueError: no adapters, an embedding adapter, or adapters whose shapes disagree.
    """
    if not adapters:
        raise ValueError("stack_adapters: need at least one adapter tree")
    flats = [lora.flatten_paths(ad) for ad in adapters]
    paths = sorted(set().union(*flats))
    out = {}
    for path in paths:
        if path.split("/")[-1] == "embedding":
            raise ValueError(f"stack_adapters: {path!r} is an embedding table, not a linear kernel (unsupported)")
        present = [f[path] for f in flats if path in f]
        ref = present[0]
        n_lead = ref.a.ndim - 2
        lead, d_in = ref.a.shape[:n_lead], ref.a.shape[n_lead]
        out_axes = ref.b.shape[n_lead + 1 :]
        r_max = max(p.rank for p in present)
        dtype = jnp.result_type(*[p.a.dtype for p in present], *[p.b.dtype for p in present])
        dora = [i for i, f in enumerate(flats) if path in f and f[path].m is not None]
        if dora and len(dora) != len(flats):
            plain = next(i for i in range(len(flats)) if i not in dora)
            raise ValueError(f"stack_adapters: {path!r}: adapter {dora[0]} is DoRA, adapter "
                             f"{plain} is not (or does not target it); DoRA stacks only with DoRA")
        a_list, b_list, scales, dropouts = [], [], [], []
        for i, f in enumerate(flats):
            p = f.get(path)
            if p is None:
                a_list.append(jnp.zeros((*lead, d_in, r_max), dtype))
                b_list.append(jnp.zeros((*lead, r_max, *out_axes), dtype))
                scales.append(0.0)
                dropouts.append(0.0)
                continue
            if p.a.shape[: n_lead + 1] != (*lead, d_in) or p.b.shape[n_lead + 1 :] != out_axes:
                raise ValueError(
                    f"stack_adapters: adapter {i} at {path!r} has a {p.a.shape}, b {p.b.shape}; "
                    f"adapter 0 has a {ref.a.shape}, b {ref.b.shape}"
                )
            pad = r_max - p.rank
            a = jnp.pad(p.a.astype(dtype), [(0, 0)] * (n_lead + 1) + [(0, pad)])
            b = jnp.pad(p.b.astype(dtype), [(0, 0)] * n_lead + [(0, pad)] + [(0, 0)] * len(out_axes))
            a_list.append(a)
            b_list.append(b)
            scales.append(float(p.scale))
            dropouts.append(float(p.dropout))
        out[path] = StackedLoraPair(
            a=jnp.stack(a_list, axis=n_lead),  # [*lead, N, in, r]
            b=jnp.stack(b_list, axis=n_lead),  # [*lead, N, r, *out]
            scales=tuple(scales),
            dropouts=tuple(dropouts),
            m=jnp.stack([f[path].m.astype(dtype) for f in flats], axis=n_lead) if dora else None,
        )
    return lora.unflatten_paths(out)


def attach_multi(base: lora.Params, stacked: lora.Adapters, ids: Array,
                 dropout_key: Array | None = None) -> lora.Params:
    """Put a `MultiLoraWeight` at each leaf adapted by ``stacked``, choosing per row by ``ids``.

    Args:
      base: base Params (Array or QTensor leaves).
      stacked: from `stack_adapters`.
      ids: ``[B]`` int, the adapter of each batch row (-1: base only).
      dropout_key: None (inference), or a key split per adapted leaf and per stacked layer,
        so that each row's low-rank input gets its own adapter's dropout rate.
    """
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim != 1:
        raise ValueError(f"attach_multi: ids must be [batch], got shape {ids.shape}")
    flat_base = lora.flatten_paths(base)
    flat = lora.flatten_paths(stacked)
    keys = None if dropout_key is None else dict(zip(flat, jax.random.split(dropout_key, len(flat)),
                                                     strict=True))
    new = {}
    for path, sp in flat.items():
        if path not in flat_base:
            raise ValueError(f"attach_multi: adapter path {path!r} is not in the base params")
        if sp.m is not None:
            raise ValueError(f"attach_multi: {path!r} holds DoRA adapters; the per-row path has "
                             "no DoRA (use attach_member, one adapter for every row)")
        w = flat_base[path]
        n_lead = sp.a.ndim - 3
        lead = tuple(sp.a.shape[:n_lead])
        if tuple(w.shape[:n_lead]) != lead or w.shape[n_lead] != sp.a.shape[-2]:
            raise ValueError(f"attach_multi: {path!r}: base {tuple(w.shape)} vs a {tuple(sp.a.shape)}")
        key = None
        if keys is not None and any(r > 0.0 for r in sp.dropouts):
            key = jax.random.split(keys[path], lead) if lead else keys[path]
        new[path] = MultiLoraWeight(
            w=w, a=sp.a, b=sp.b, ids=jnp.broadcast_to(ids, (*lead, ids.shape[0])), key=key,
            scales=sp.scales, dropouts=sp.dropouts,
        )
    return replace_paths(base, new)


def member_pairs(stacked: lora.Adapters, j: Array | int) -> dict[str, tuple[Array, ...]]:
    """Adapter `j` (a traced index is fine) of `stacked`: ``{path: (a, b)}`` at the padded
    rank, ``a [*lead, in, r_max]``, ``b [*lead, r_max, *out]`` (DoRA: ``(a, b, m)``,
    ``m [*lead, *out]``)."""
    out = {}
    for path, sp in lora.flatten_paths(stacked).items():
        n_lead = sp.a.ndim - 3
        arrays = (sp.a, sp.b) if sp.m is None else (sp.a, sp.b, sp.m)
        out[path] = tuple(jnp.take(x, j, axis=n_lead) for x in arrays)
    return out


def attach_member(base: lora.Params, stacked: lora.Adapters, j: Array | int,
                  pairs: dict[str, tuple[Array, Array]] | None = None,
                  dropout_key: Array | None = None) -> lora.Params:
    """Adapter `j` of `stacked` on `base` as plain `lora.LoraWeight`s: every row through it.

    The single-adapter path of `lora.linear` (the folded ``x @ (W + s A B)`` and its custom
    VJP), for an index `j` that may be traced, as in a scan over a population's members:
    `LoraWeight.scale` is static, so adapter j's scale multiplies `b` inside the program
    (``A (s B) = s A B``). `pairs`: adapter j's ``(a, b)`` per path, e.g. the variables a
    gradient is taken for (default `member_pairs(stacked, j)`). Dropout (with a key) needs
    one rate per leaf across the adapters (`uniform_dropout`); per-adapter rates are
    `attach_multi`'s.
    """
    flat_base = lora.flatten_paths(base)
    flat = lora.flatten_paths(stacked)
    pairs = member_pairs(stacked, j) if pairs is None else pairs
    keys = None if dropout_key is None else dict(zip(flat, jax.random.split(dropout_key, len(flat)),
                                                     strict=True))
    new = {}
    for path, sp in flat.items():
        a, b, *m = pairs[path]
        w = flat_base[path]
        lead = tuple(sp.a.shape[: sp.a.ndim - 3])
        rates = set(sp.dropouts) or {0.0}
        key = None
        if keys is not None and max(rates) > 0.0:
            key = jax.random.split(keys[path], lead) if lead else keys[path]
        if len(rates) > 1 and key is not None:
            raise ValueError(f"attach_member: {path!r}: the adapters' dropout rates differ "
                             f"{sp.dropouts}; use attach_multi (per-row rates)")
        scale = jnp.asarray(sp.scales, b.dtype)[j]
        new[path] = lora.LoraWeight(w=w, a=a, b=b * scale, key=key, scale=1.0,
                                    dropout=max(rates) if key is not None else 0.0,
                                    m=m[0] if m else None)
    return replace_paths(base, new)


def uniform_dropout(stacked: lora.Adapters) -> bool:
    """Whether every leaf's adapters share one dropout rate (what `attach_member` needs)."""
    return all(len(set(sp.dropouts)) <= 1 for sp in lora.flatten_paths(stacked).values())


def put_member(stacked: lora.Adapters, j: Array | int,
               pairs: dict[str, tuple[Array, Array]]) -> lora.Adapters:
    """`stacked` with adapter `j`'s ``(a, b)`` replaced by `pairs` (as `member_pairs` gives
    them); differentiable in `pairs`, `j` may be traced."""
    new = {}
    for path, sp in lora.flatten_paths(stacked).items():
        n_lead = sp.a.ndim - 3
        a, b, *m = pairs[path]
        new[path] = dataclasses.replace(sp, a=_put(sp.a, a, j, n_lead),
                                        b=_put(sp.b, b, j, n_lead),
                                        m=_put(sp.m, m[0], j, n_lead) if m else sp.m)
    return lora.unflatten_paths(new)


def _put(stack: Array, x: Array, j: Array | int, axis: int) -> Array:
    idx = [0] * stack.ndim
    idx[axis] = j
    return jax.lax.dynamic_update_slice(stack, jnp.expand_dims(x, axis).astype(stack.dtype), idx)


def padded_pairs(adapter: lora.Adapters, stacked: lora.Adapters) -> dict[str, tuple[Array, Array]]:
    """One adapter tree as ``{path: (a, b)}`` at the padded rank of `stacked` (a
    `stack_adapters` tree, or its `jax.eval_shape`), zeros where it targets no such path;
    DoRA leaves as ``(a, b, m)`` (stacked DoRA leaves are targeted by every adapter)."""
    flat = lora.flatten_paths(adapter)
    out = {}
    for path, sp in lora.flatten_paths(stacked).items():
        n_lead = sp.a.ndim - 3
        a_shape = (*sp.a.shape[:n_lead], *sp.a.shape[n_lead + 1:])
        b_shape = (*sp.b.shape[:n_lead], *sp.b.shape[n_lead + 1:])
        p = flat.get(path)
        if p is None:
            out[path] = (jnp.zeros(a_shape, sp.a.dtype), jnp.zeros(b_shape, sp.b.dtype))
            continue
        pad = sp.a.shape[-1] - p.rank
        out[path] = (jnp.pad(p.a.astype(sp.a.dtype), [(0, 0)] * (p.a.ndim - 1) + [(0, pad)]),
                     jax.lax.pad(p.b.astype(sp.b.dtype), jnp.zeros((), sp.b.dtype),
                                 [(0, pad if ax == n_lead else 0, 0) for ax in range(p.b.ndim)]))
        if sp.m is not None:
            out[path] += (p.m.astype(sp.m.dtype),)
    return out


def unpad(pairs: dict[str, tuple[Array, Array]], adapter: lora.Adapters) -> lora.Adapters:
    """The inverse of `padded_pairs`: a tree shaped like `adapter` (its paths, ranks and
    metadata) from padded ``(a, b)`` arrays, e.g. their gradients."""
    flat = {}
    for path, p in lora.flatten_paths(adapter).items():
        a, b, *m = pairs[path]
        n_lead = a.ndim - 2
        flat[path] = dataclasses.replace(
            p, a=a[..., : p.rank].astype(p.a.dtype),
            b=jax.lax.slice_in_dim(b, 0, p.rank, axis=n_lead).astype(p.b.dtype),
            m=m[0].astype(p.m.dtype) if m else None)
    return lora.unflatten_paths(flat)


def multi_linear(x: Array, w: MultiLoraWeight, bias: Array | None = None) -> Array:
    """``y[i] = x[i] @ W + s[ids[i]] * (x[i] @ A[ids[i]]) @ B[ids[i]] (+ bias)``.

    Args:
      x: ``[B, ..., in]`` (batch rows first, as in the models).
      w: a `MultiLoraWeight` without leading axes (inside the layer scan).
      bias: optional ``[*out]``.

    Returns:
      ``[B, ..., *out]`` in ``x.dtype``: one base matmul for the whole batch, the low-rank path
      through gathered per-row ``A [B, in, r]`` and ``B [B, r, out]``.
    """
    y = lora.linear(x, w.w, bias)  # [B, ..., *out] the shared base matmul (dequantized once)
    ids = w.ids  # [B]
    safe = jnp.clip(ids, 0, len(w.scales) - 1)
    scale = jnp.where(ids >= 0, jnp.asarray(w.scales, x.dtype)[safe], 0.0).astype(x.dtype)  # [B]
    a = jnp.take(w.a, safe, axis=0).astype(x.dtype)  # [B, in, r]
    r = a.shape[-1]
    b = jnp.take(w.b, safe, axis=0).astype(x.dtype).reshape(ids.shape[0], r, -1)  # [B, r, out]
    xb = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, M, in]
    if w.key is not None:  # inverted dropout at each row's own adapter's rate
        rate = jnp.asarray(w.dropouts, x.dtype)[safe][:, None, None]  # [B, 1, 1]
        keep = jax.random.uniform(w.key, xb.shape) >= rate
        xb = jnp.where(keep, xb / (1.0 - rate), jnp.zeros_like(xb))
    h = jax.lax.dot_general(xb, a, (((2,), (1,)), ((0,), (0,))))  # [B, M, r]
    d = jax.lax.dot_general(h, b, (((2,), (1,)), ((0,), (0,))))  # [B, M, out]
    d = d * scale[:, None, None]
    return y + d.reshape(y.shape).astype(y.dtype)


lora.register_linear(MultiLoraWeight, multi_linear)


def forward(cfg: Any, params: lora.Params, tokens: Array, stacked: lora.Adapters, ids: Array,
            **kwargs: Any) -> Array:
    """`jaxlora.models.forward` where batch row ``i`` uses adapter ``ids[i]`` of ``stacked``.

    Args:
      cfg, params, tokens: as for `jaxlora.models.forward` (tokens ``[B, T]``).
      stacked: from `stack_adapters`.
      ids: ``[B]`` int adapter index per row (-1 = base model).
      **kwargs: passed on (``segment_ids``, ``positions``, ``compute_dtype``, ...); no
        ``adapters`` and no dropout (inference).
    """
    from jaxlora import models

    if kwargs.get("adapters") is not None or kwargs.get("dropout_key") is not None:
        raise ValueError("multi.forward: pass adapters via `stacked`; no dropout in multi-adapter inference")
    ids = jnp.asarray(ids, jnp.int32)
    if ids.shape != (tokens.shape[0],):
        raise ValueError(f"multi.forward: ids must be [{tokens.shape[0]}], got shape {ids.shape}")
    return models.forward(cfg, attach_multi(params, stacked, ids), tokens, **kwargs)


def generate_tokens(cfg: Any, params: lora.Params, prompts: Sequence[Sequence[int]],
                    stacked: lora.Adapters, ids: Sequence[int], **kwargs: Any) -> list[list[int]]:
    """`jaxlora.generate.generate_tokens` where prompt ``i`` is answered with adapter ``ids[i]``.

    One batched decode: the base projections run once for all rows, each row adds its own
    low-rank path. ``kwargs`` as for `jaxlora.generate.generate_tokens` (no ``adapters``).
    """
    from jaxlora import generate

    if kwargs.get("adapters") is not None:
        raise ValueError("multi.generate_tokens: pass adapters via `stacked`")
    ids = jnp.asarray(ids, jnp.int32)
    if ids.shape != (len(prompts),):
        raise ValueError(f"multi.generate_tokens: ids must be [{len(prompts)}], got {ids.shape}")
    return generate.generate_tokens(cfg, attach_multi(params, stacked, ids), prompts, **kwargs)
