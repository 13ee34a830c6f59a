"""Decoder-only language models (Llama family, GPT-2) and their functional entry points.

How NNX is used: the NNX modules `Llama` and `GPT2` define the parameter *structure* and the
*initialization* (blocks created with `nnx.vmap`, so every leaf under `layers/` is stacked on
a leading layer axis). `init_params` builds a module and returns
`nnx.state(model, nnx.Param).to_pure_dict()`: a plain nested dict with exactly the paths of
docs/DESIGN.md. Everything after that is pure functions over that dict (`forward`, `logits`,
`decode_step`), so parameter leaves may be float arrays, `quant.QTensor`s or the
`lora.LoraWeight` views that `lora.attach` puts in place -- no NNX graph has to carry them
through `jit` / `lax.scan`. Every projection and embedding goes through `jaxlora.lora`.

Example:
  >>> cfg = ModelConfig.tiny_llama()
  >>> params = init_params(cfg, jax.random.key(0))
  >>> logits = forward(cfg, params, jnp.zeros((2, 8), jnp.int32))  # [2, 8, vocab] float32
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import lora
from jaxlora.models import common, gpt2, llama
from jaxlora.models.common import KVCache
from jaxlora.models.config import ModelConfig
from jaxlora.models.gpt2 import GPT2
from jaxlora.models.llama import Llama

__all__ = [
    "ModelConfig",
    "Llama",
    "GPT2",
    "Params",
    "KVCache",
    "init_params",
    "forward",
    "logits",
    "init_cache",
    "decode_step",
]

Array = jax.Array
Params = lora.Params

_ARCH = {"llama": llama, "gpt2": gpt2}
_MODULES = {"llama": Llama, "gpt2": GPT2}


def _arch(cfg: ModelConfig):
    try:
        return _ARCH[cfg.arch]
    except KeyError:
        raise ValueError(f"ModelConfig.arch: unknown architecture {cfg.arch!r} "
                         f"(expected one of {sorted(_ARCH)})") from None


def init_params(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Randomly initialized parameters (normal(0.02) kernels/embeddings, unit norms).

    Returns a nested dict with the docs/DESIGN.md paths; leaves under `layers/` are `[L, ...]`.
    """
    _arch(cfg)
    return _init_params_jit(cfg, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params_jit(cfg: ModelConfig, key: Array, dtype: Any) -> Params:
    # Jitted: one compiled program instead of hundreds of eagerly dispatched NNX init ops.
    model = _MODULES[cfg.arch](cfg, dtype=dtype, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _positions(tokens: Array, segment_ids: Array | None, positions: Array | None) -> Array:
    if positions is not None:
        return jnp.asarray(positions, jnp.int32)
    if segment_ids is not None:
        return common.positions_from_segments(segment_ids)
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def forward(cfg: ModelConfig, params: Params, tokens: Array, *, adapters: Any = None,
            segment_ids: Array | None = None, positions: Array | None = None,
            dropout_key: Array | None = None, compute_dtype: Any = jnp.float32,
            remat: str = "none", return_hidden: bool = False,
            scan_layers: bool = True) -> Array:
    """Causal LM forward pass.

    Args:
      cfg: the architecture.
      params: base parameters (float arrays and/or QTensor leaves).
      tokens: [B, T] int token ids.
      adapters: optional LoRA adapter tree; attached with `lora.attach(params, adapters,
        dropout_key)` (dropout only when `dropout_key` is given).
      segment_ids: optional [B, T] ints; tokens attend only within equal ids (packed
        documents). When `positions` is None they also restart the positions per segment.
      positions: optional [B, T] ints (default 0..T-1, or per segment as above).
      compute_dtype: activations / matmul dtype (float32 on CPU, bfloat16 on accelerators).
      remat: "none" | "full" | "attn" | "dots" -- `jax.checkpoint` policy around each block
        (see `common.remat_policy`).
      return_hidden: return the final normed hidden states [B, T, d] (compute dtype) instead
        of logits, so the caller can chunk the vocabulary projection with `logits`.
      scan_layers: `lax.scan` over the stacked blocks (default); False unrolls (tests).

    Returns:
      logits [B, T, V] float32, or hidden [B, T, d] with `return_hidden=True`.
    """
    arch = _arch(cfg)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"forward: tokens must be [batch, seq], got shape {tokens.shape}")
    if cfg.arch == "gpt2" and tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"forward: sequence length {tokens.shape[1]} exceeds GPT-2's "
                         f"{cfg.max_position_embeddings} learned positions")
    if adapters is not None:
        params = lora.attach(params, adapters, dropout_key)
    pos = _positions(tokens, segment_ids, positions)
    mask = common.new_token_mask(tokens.shape[0], tokens.shape[1], segment_ids)
    hidden, _ = arch.apply(cfg, params, tokens, pos, mask, None, compute_dtype=compute_dtype,
                           remat=remat, scan=scan_layers)
    if return_hidden:
        return hidden
    return arch.head(cfg, params, hidden)


def logits(cfg: ModelConfig, params: Params, hidden: Array, adapters: Any = None) -> Array:
    """The LM head on final hidden states `[..., d]` -> float32 logits `[..., V]`."""
    if adapters is not None:
        params = lora.attach(params, adapters)
    return _arch(cfg).head(cfg, params, hidden)


def init_cache(cfg: ModelConfig, batch: int, size: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty KV cache with `size` slots for `batch` rows."""
    return common.init_cache(cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim, dtype)


def decode_step(cfg: ModelConfig, params: Params, tokens: Array, positions: Array,
                cache: KVCache, *, token_valid: Array | None = None, adapters: Any = None,
                compute_dtype: Any = jnp.float32) -> tuple[Array, KVCache]:
    """Run new tokens against a KV cache: prefill (T = prompt length) or one decode step.

    The new tokens see every valid cache slot and, causally, each other; their keys/values
    are written at slots `cache.index .. cache.index + T - 1`.

    Args:
      tokens, positions: [B, T] ints.
      cache: from `init_cache` or a previous call.
      token_valid: optional [B, T] bool; False marks (left) padding, which no token attends to.
      adapters: optional LoRA adapters (attached here, without dropout). Generation loops
        should attach once outside the loop and pass the attached params instead.
    Returns:
      (logits of the last new token [B, V] float32, updated cache).
    """
    arch = _arch(cfg)
    if adapters is not None:
        params = lora.attach(params, adapters)
    b, t = tokens.shape
    if token_valid is None:
        token_valid = jnp.ones((b, t), bool)
    mask = common.new_token_mask(b, t, None, token_valid)
    hidden, (k, v) = arch.apply(cfg, params, tokens, positions, mask, cache,
                                compute_dtype=compute_dtype)
    cache = common.write_cache(cache, k, v, token_valid)
    return arch.head(cfg, params, hidden[:, -1]), cache
