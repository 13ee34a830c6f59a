"""Decoder-only language models (Llama family, Gemma 3, GPT-2) and their functional entry points.

Each architecture is declared once, as a `Family` record (`record.py`; `llama.FAMILY`,
`gemma.FAMILY`, `gpt2.FAMILY`): its initializer, the parameter shapes derived from it, the
checkpoint names of every parameter path, the paths the LM head reads. `family(cfg)` returns it; the loaders, the
exports and the loss read it. `init_params` returns a plain nested dict with exactly the paths
of docs/DESIGN.md (every leaf under `layers/` stacked on a leading layer axis). Everything after
that is pure functions over that dict (`forward`, `logits`, `decode_step`), so parameter leaves
may be float arrays, `quant.QTensor`s or the `lora.LoraWeight` views that `lora.attach` puts
in place. Every projection and embedding goes through `jaxlora.lora`.

Example:
  >>> cfg = ModelConfig.tiny_llama()
  >>> params = init_params(cfg, jax.random.key(0))
  >>> logits = forward(cfg, params, jnp.zeros((2, 8), jnp.int32))  # [2, 8, vocab] float32
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import lora
from jaxlora.models import common, gemma, gpt2, llama, record
from jaxlora.models.common import KVCache
from jaxlora.models.config import ModelConfig
from jaxlora.models.record import Family, TensorNames
from jaxlora.paths import flatten_paths, unflatten_paths

__all__ = [
    "ModelConfig",
    "Family",
    "TensorNames",
    "FAMILIES",
    "family",
    "param_shapes",
    "head_adapters",
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

FAMILIES: dict[str, Family] = {f.arch: f for f in (llama.FAMILY, gemma.FAMILY, gpt2.FAMILY)}


def family(cfg: ModelConfig | str) -> Family:
    """The record of `cfg`'s architecture (or of an arch name: "llama" | "gemma3" | "gpt2")."""
    arch = getattr(cfg, "arch", cfg)
    fam = FAMILIES.get(arch) if isinstance(arch, str) else None
    if fam is None:
        raise ValueError(f"ModelConfig.arch: unknown architecture {arch!r} "
                         f"(expected one of {sorted(FAMILIES)})")
    return fam


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """DESIGN.md path -> full leaf shape of `cfg`'s parameters (leading `L` under `layers/`)."""
    return family(cfg).shapes(cfg)


def head_adapters(cfg: ModelConfig, adapters: Any) -> Any:
    """The sub-tree of `adapters` that reaches the logits through the LM head (None if None).

    The loss pulls the logits' gradient back through the head itself; these are the adapters
    whose gradient that pullback gives.
    """
    if adapters is None:
        return None
    heads = family(cfg).head_paths(cfg)
    return unflatten_paths({p: a for p, a in flatten_paths(adapters).items() if p in heads})


def init_params(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Randomly initialized parameters (normal(0.02) kernels/embeddings, unit norms).

    Returns a nested dict with the docs/DESIGN.md paths; leaves under `layers/` are `[L, ...]`.
    """
    family(cfg)
    return _init_params_jit(cfg, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params_jit(cfg: ModelConfig, key: Array, dtype: Any) -> Params:
    # Jitted: one compiled program instead of hundreds of eagerly dispatched init ops.
    return family(cfg).init(cfg, key, dtype)


def _head(cfg: ModelConfig, params: Params, hidden: Array) -> Array:
    """LM head on final hidden states `[..., d]` -> float32 logits `[..., V]`."""
    (path,) = family(cfg).head_paths(cfg)
    table = functools.reduce(operator.getitem, path.split("/"), params)
    if path == record.LM_HEAD:
        return lora.linear(hidden, table).astype(jnp.float32)
    return lora.attend(hidden, table).astype(jnp.float32)


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
    fam = family(cfg)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"forward: tokens must be [batch, seq], got shape {tokens.shape}")
    if fam.learned_positions and tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"forward: sequence length {tokens.shape[1]} exceeds the "
                         f"{cfg.max_position_embeddings} learned positions of {cfg.arch}")
    if adapters is not None:
        params = lora.attach(params, adapters, dropout_key)
    pos = _positions(tokens, segment_ids, positions)
    mask = common.new_token_mask(tokens.shape[0], tokens.shape[1], segment_ids)
    hidden, _ = fam.apply(cfg, params, tokens, pos, mask, None, compute_dtype=compute_dtype,
                           remat=remat, scan=scan_layers)
    if return_hidden:
        return hidden
    return _head(cfg, params, hidden)


def logits(cfg: ModelConfig, params: Params, hidden: Array, adapters: Any = None) -> Array:
    """The LM head on final hidden states `[..., d]` -> float32 logits `[..., V]`."""
    if adapters is not None:
        params = lora.attach(params, adapters)
    return _head(cfg, params, hidden)


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
    fam = family(cfg)
    if adapters is not None:
        params = lora.attach(params, adapters)
    b, t = tokens.shape
    if token_valid is None:
        token_valid = jnp.ones((b, t), bool)
    mask = common.new_token_mask(b, t, None, token_valid)
    hidden, (k, v) = fam.apply(cfg, params, tokens, positions, mask, cache,
                                compute_dtype=compute_dtype)
    cache = common.write_cache(cache, k, v, token_valid, positions)
    return _head(cfg, params, hidden[:, -1]), cache
