"""Run a user's own Flax NNX model with LoRA adapters and / or quantized (QTensor) weights.

`nnx_params(model)` gives the model's ``Params`` (paths are the NNX attribute paths, so
`jaxlora.lora.LoraSpec` targets, `jaxlora.lora.init` and ``quant.quantize_tree`` apply to
them). `nnx_bind(model, params, adapters)` returns a copy of the model whose nnx.Linear /
nnx.LinearGeneral / nnx.Einsum / nnx.Embed layers run the same primitive as jaxlora's own
models (`jaxlora.lora.primitive.einsum`, `embed`, `attend`): LoRA (arXiv 2106.09685) on a
float or QTensor base, the backward keeping the packed codes rather than a dense weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import quant
from jaxlora.lora.primitive import Adapters, LoraWeight, Params, attach, attend, einsum, embed
from jaxlora.paths import flatten_paths

__all__ = ["nnx_params", "nnx_bind"]

Array = jax.Array


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
    return isinstance(x, (LoraWeight, quant.QTensor))


def _nnx_promote(args: tuple, /, *, dtype: Any = None, inexact: bool = True) -> tuple:
    """``nnx.nn.dtypes.promote_dtype`` that lets LoraWeight / QTensor weights pass through."""
    from flax.nnx.nn import dtypes

    probes = [jnp.zeros((), x.dtype) if _special(x) else x for x in args]
    dt = dtypes.canonicalize_dtype(*probes, dtype=dtype, inexact=inexact)
    return tuple(x if x is None or _special(x) else jnp.asarray(x, dt) for x in args)


def _lora_einsum(eq: str, x: Array, w: Any, **kwargs: Any) -> Array:
    """``einsum(eq, x, W)`` (nnx.Einsum's ``einsum_op``) where ``W`` may be a QTensor or LoraWeight.

    Such kernels run `jaxlora.lora.primitive.einsum`, the primitive `linear` is built on: the
    LoRA term factorizes the kernel along its first axis, ``W[k0, k...] = A[k0, r] B[r, k...]``,
    and neither path keeps a dense float weight for the backward. Only ``precision`` is passed
    on.
    """
    precision = kwargs.get("precision")
    if not _special(w):
        return jnp.einsum(eq, x, w, precision=precision)
    return einsum(eq, x, w, precision=precision)


def _nnx_dot_general(
    lhs: Array,
    rhs: Any,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **_: Any,
) -> Array:
    """``lax.dot_general`` for nnx.Linear / nnx.LinearGeneral: special kernels run `einsum`."""
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
    return einsum(f"{''.join(ls)},{''.join(rs)}->{''.join(out)}", lhs, rhs, precision=precision)


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
