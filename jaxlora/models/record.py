"""The family record: what jaxlora needs to know about one architecture, in one place.

A `Family` holds the initializer (the parameter shapes are derived from it with
`jax.eval_shape`, so no shape table is written by hand), the forward (`apply`), the names each
parameter path has in the checkpoint formats (one `TensorNames` row per path: Hugging Face
safetensors, GGUF, PEFT), the paths the LM head reads, and the format facts that differ
between architectures. The loaders (`jaxlora.io.hf`, `jaxlora.io.gguf`), the PEFT and merged
exports (`jaxlora.io.peft`, `save_hf`) and the loss read it; `jaxlora.models.family(cfg)`
returns the record of a config.

The initializer is written as a *layout*: an ordered `{path: (init, shape)}` dict that
`init_layout` turns into random parameters. Each top-level leaf draws from
`fold_in(key, its index)`; the stacked blocks (`layers/` leaves, contiguous in the layout) share
one draw that is split into one key per layer, and each block leaf draws from
`fold_in(layer_key, its index within the block)`. That is the random stream of the Flax NNX
modules earlier versions built the parameters with (one `rngs.params()` call per parameter,
`nnx.split_rngs` + `nnx.vmap` over the blocks), so a seed gives the same model as before.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.models.config import ModelConfig
from jaxlora.paths import flatten_paths, unflatten_paths

__all__ = ["Family", "TensorNames", "Layout", "init_layout", "hf_layer", "INIT_STD", "LM_HEAD"]

Array = jax.Array
Params = dict[str, Any]
# path -> (initializer, shape); "layers/" leaves without their leading L axis.
Layout = dict[str, tuple[str, tuple[int, ...]]]

INIT_STD = 0.02  # normal(0, 0.02) kernels and embeddings (GPT-2 / Llama reference inits)
LM_HEAD = "lm_head/kernel"  # the untied LM head's path, in every family that can untie it
_INITS = ("normal", "ones", "zeros")


class TensorNames(NamedTuple):
    """The names of one parameter path in the checkpoint formats (`{i}` = layer index)."""

    path: str  # DESIGN.md path, e.g. "layers/attn/q_proj/kernel"
    hf: str  # safetensors name, without the family's `hf_prefix`
    gguf: str  # llama.cpp name
    peft: str | None = None  # PEFT `target_modules` name; None: not a PEFT LoRA target
    rope: str | None = None  # "q" | "k": llama.cpp permutes its rows (num_heads / num_kv_heads)


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture: initializer, forward, tensor names, head and format facts."""

    arch: str  # the `ModelConfig.arch` it serves
    init: Callable[[ModelConfig, Array, Any], Params]  # (cfg, key, dtype) -> Params
    apply: Callable[..., tuple[Array, Any]]  # embeddings + blocks + final norm (see llama.apply)
    tensors: tuple[TensorNames, ...]  # every path any config of the family can have
    embedding: str  # the token embedding table; the LM head when embeddings are tied
    can_untie: bool  # whether `tie_embeddings=False` gives a separate `LM_HEAD`
    learned_positions: bool  # positions beyond `max_position_embeddings` do not exist
    hf_prefix: str = ""  # written before every HF name; stripped when a file has it
    hf_kernels_in_out: bool = False  # HF stores kernels [in, out] (GPT-2 Conv1D), not [out, in]
    hf_ignored: str = r"^$"  # regex (re.search) of HF buffers that are not weights
    # Where a checkpoint stores the LM head (HF, GGUF); with tied embeddings a copy of the
    # embedding that is skipped on reading.
    head_copy: tuple[str, str] = ("lm_head.weight", "output.weight")
    # llama.cpp stores Gemma's norm weights w as w + 1 (its RMSNorm multiplies by the weight);
    # the GGUF reader subtracts this from every `/scale` leaf.
    gguf_norm_shift: float = 0.0
    # The chat template of checkpoints that carry none (Gemma 3 GGUFs), or None.
    chat_template: str | None = None
    # Tokens that end a reply besides EOS (Gemma's "<end_of_turn>"): generation stops there.
    stop_tokens: tuple[str, ...] = ()

    def shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Path -> full leaf shape (leading `L` for `layers/` leaves), from `jax.eval_shape`."""
        return dict(_shapes(self.init, cfg))

    def head_paths(self, cfg: ModelConfig) -> tuple[str, ...]:
        """The parameter paths the LM head reads (the logits' only parameters)."""
        return (LM_HEAD,) if self.can_untie and not cfg.tie_embeddings else (self.embedding,)

    def peft_modules(self) -> dict[str, tuple[str, str]]:
        """Path -> (PEFT module name template, `target_modules` name) of the LoRA targets."""
        return {t.path: (self.hf_prefix + t.hf.removesuffix(".weight"), t.peft)
                for t in self.tensors if t.peft is not None}


def hf_layer(path: str, hf: str, gguf: str, **kw: Any) -> TensorNames:
    """The names of a `layers/` leaf in the Llama-style naming (`model.layers.{i}.`, `blk.{i}.`)."""
    return TensorNames(f"layers/{path}", f"model.layers.{{i}}.{hf}", f"blk.{{i}}.{gguf}", **kw)


@functools.lru_cache(maxsize=64)
def _shapes(init: Callable, cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    tree = jax.eval_shape(lambda key: init(cfg, key, jnp.float32), jax.random.key(0))
    return tuple((p, tuple(leaf.shape)) for p, leaf in flatten_paths(tree).items())


def _draw(kind: str, key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    if kind == "normal":
        return jax.nn.initializers.normal(INIT_STD)(key, shape, dtype)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    raise ValueError(f"layout: unknown initializer {kind!r} (expected one of {_INITS})")


def init_layout(layout: Layout, key: Array, num_layers: int, dtype: Any) -> Params:
    """Random parameters of `layout` (see the module docstring for the random stream).

    Returns the nested dict; `layers/` leaves are stacked `[num_layers, *shape]`.
    """
    out: dict[str, Array] = {}
    count, block, layer_keys = 0, 0, None
    for path, (kind, shape) in layout.items():
        if path.startswith("layers/"):
            if layer_keys is None:
                layer_keys = jax.random.split(jax.random.fold_in(key, count), num_layers)
                count += 1
            elif not next(reversed(out)).startswith("layers/"):
                raise ValueError(f"layout: {path} is not contiguous with the other layers/ leaves")
            out[path] = jax.vmap(
                lambda k, j=block, kind=kind, shape=shape: _draw(kind, jax.random.fold_in(k, j),
                                                                 shape, dtype))(layer_keys)
            block += 1
        else:
            out[path] = _draw(kind, jax.random.fold_in(key, count), shape, dtype)
            count += 1
    return unflatten_paths(out)
