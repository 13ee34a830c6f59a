"""Pieces shared by the model families: norms, RoPE, attention masks, KV cache, layer scan.

Everything here is a pure function of arrays (no NNX, no LoRA, no quantization): the model
files pass whatever parameter leaf they hold to `jaxlora.lora.linear` / `embed` / `attend`,
and use these helpers for the parameter-free parts.

Attention takes the keys/values of the *new* tokens plus, optionally, a preallocated KV cache
of earlier tokens. The cache is read but never written inside a layer; the layer returns its
new keys/values and the caller writes all layers into the cache with one
`dynamic_update_slice` after the layer scan (in place inside a decode `while_loop`).

Sliding-window (local) attention (Beltagy et al. 2020, "Longformer"; Gemma 3 interleaves it
with global layers) is a narrower mask: `window_mask` keeps the keys whose position is less than
`window` behind the query's. The cache records each slot's position, so the same mask holds in
the KV-cache decoding path.

RoPE follows the Hugging Face "rotate_half" layout (first half / second half of each head),
with Llama 3 frequency scaling (Meta, "The Llama 3 Herd of Models", 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "KVCache",
    "init_cache",
    "write_cache",
    "rms_norm",
    "layer_norm",
    "rope_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "attention",
    "query_blocks",
    "new_token_mask",
    "cache_mask",
    "window_mask",
    "positions_from_segments",
    "run_layers",
    "run_cached_layers",
    "remat_policy",
    "REMAT_POLICIES",
]

Array = jax.Array

# A large finite negative instead of -inf: a query row whose keys are all masked (a padding
# query) then averages values instead of producing NaN that could leak through `where`.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class KVCache(NamedTuple):
    """Preallocated keys/values of all layers for incremental decoding.

    k, v:  [L, B, S, n_kv, head_dim]  keys/values of slots 0..S-1
    valid: [B, S] bool                 slot holds a real (non-padding) token
    positions: [B, S] int32            the position of each slot's token (for sliding windows)
    index: int32 scalar                next slot to write (shared by all rows)
    """

    k: Array
    v: Array
    valid: Array
    positions: Array
    index: Array


def init_cache(num_layers: int, batch: int, size: int, num_kv_heads: int, head_dim: int,
               dtype: Any = jnp.float32) -> KVCache:
    """An empty cache with `size` slots per row."""
    shape = (num_layers, batch, size, num_kv_heads, head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, size), bool), positions=jnp.zeros((batch, size), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def write_cache(cache: KVCache, k_new: Array, v_new: Array, token_valid: Array,
                positions: Array) -> KVCache:
    """Write new keys/values `[L, B, T, n_kv, hd]` (and their valid flags and positions
    `[B, T]`) at slots index..index+T-1 of every row."""
    i = cache.index
    zero = jnp.zeros((), jnp.int32)
    k = jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), (zero, zero, i, zero, zero))
    v = jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), (zero, zero, i, zero, zero))
    valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (zero, i))
    pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (zero, i))
    return KVCache(k, v, valid, pos, i + k_new.shape[2])


# ----------------------------------------------------------------------------- norms


@jax.named_scope("norm")
def rms_norm(x: Array, scale: Array, eps: float, offset: float = 0.0) -> Array:
    """RMSNorm (Zhang & Sennrich 2019), computed in float32, returned in x's dtype.

    The normalized x is multiplied by `offset + scale`: Gemma stores its norm weights as the
    difference from 1 (`offset=1.0`, so zero-initialized weights are the identity).
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * (offset + scale.astype(jnp.float32))).astype(x.dtype)


@jax.named_scope("norm")
def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """LayerNorm (Ba et al. 2016), computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Array:
    """Inverse frequencies `[head_dim // 2]` (float32), with optional rope scaling.

    Supported `scaling["rope_type"]`: "default", "linear" (positions divided by `factor`) and
    "llama3" (low frequencies divided by `factor`, smooth interpolation in between).
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2.0 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling: unsupported rope_type {kind!r} (default, linear, llama3)")


def rope_cos_sin(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
    """cos/sin tables `[B, T, head_dim]` (float32) for integer positions `[B, T]`."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, hd]
    return jnp.cos(angles), jnp.sin(angles)


@jax.named_scope("rope")
def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate `x [B, T, heads, hd]` by position (rotate_half layout), in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- attention


def positions_from_segments(segment_ids: Array) -> Array:
    """Positions `[B, T]` that restart at 0 wherever the segment id changes."""
    _, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def new_token_mask(batch: int, t: int, segment_ids: Array | None = None,
                   token_valid: Array | None = None) -> Array:
    """Mask `[B, T, T]` among the new tokens: causal, same segment, key is a real token."""
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = jnp.broadcast_to(causal, (batch, t, t))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if token_valid is not None:
        mask = mask & token_valid[:, None, :]
    return mask


def cache_mask(cache: KVCache, t: int) -> Array:
    """Which cache slots `[B, T, S]` each of `t` new tokens may see: the valid ones."""
    b, s = cache.valid.shape
    return jnp.broadcast_to(cache.valid[:, None, :], (b, t, s))


def window_mask(mask: Array, q_pos: Array, k_pos: Array, window: int) -> Array:
    """`mask [B, T, S]` narrowed to keys less than `window` positions behind the query.

    q_pos: [B, T], k_pos: [B, S] ints. A query at position i keeps key j only when
    i - j < window (itself and the window - 1 before it), as Hugging Face and llama.cpp do.
    """
    return mask & (q_pos[:, :, None] - k_pos[:, None, :] < window)


# Queries per block of `attention`: at most `_MAX_BLOCKS` blocks, each at least this long.
_QUERY_BLOCK = 64
_MAX_BLOCKS = 32


def query_blocks(t: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` query blocks `attention` splits ``t`` new tokens into."""
    tb = max(_QUERY_BLOCK, -(-t // _MAX_BLOCKS))
    return [(s0, min(s0 + tb, t)) for s0 in range(0, t, tb)]


@jax.named_scope("attention")
def attention(q: Array, k: Array, v: Array, mask: Array,
              cache: tuple[Array, Array, Array] | None = None,
              scale: float | None = None) -> Array:
    """Grouped-query causal softmax attention (Vaswani et al. 2017; GQA: Ainslie et al. 2023).

    Args:
      q: [B, T, H, hd] queries (already rotated); k, v: [B, T, KV, hd] for the new tokens.
      mask: [B, T, T] bool, which new keys each new query may see. It must be causal (no
        query sees a later new token), as `new_token_mask` and `window_mask` make it: the
        queries run in blocks (`query_blocks`), and a block reads only the new keys up to its
        last query, which skips the masked upper triangle's matmuls and softmax.
      cache: optional (k_cache [B, S, KV, hd], v_cache, mask_cache [B, T, S]) of earlier tokens.
      scale: the scores' factor (default 1 / sqrt(hd)).
    Returns:
      [B, T, H * hd] in q's dtype. Scores and softmax are float32. A query whose keys are all
      masked (a padding query) averages the values its block reads.
    """
    s_cache = 0
    if cache is not None:
        kc, vc, mc = cache
        s_cache = kc.shape[1]
        k = jnp.concatenate([kc.astype(k.dtype), k], axis=1)  # [B, S+T, KV, hd]
        v = jnp.concatenate([vc.astype(v.dtype), v], axis=1)
        mask = jnp.concatenate([mc, mask], axis=-1)  # [B, T, S+T]
    b, t, h, hd = q.shape
    kv = k.shape[2]
    g = h // kv
    # The g query heads that share a key/value head are stacked along the query axis, so each
    # KV head is one [G*Tb, hd] x [hd, S] matmul with the batch axes leading (faster on CPU
    # than a 5-D einsum with the heads between the token axes). Blocks of 64 queries also keep
    # each block's scores in cache: on a 2-core CPU the forward and backward of SmolLM2's
    # attention at 4 x 256 take 0.4x the time of one 256-query block (benchmarks/RESULTS.md).
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    q = (q * scale).astype(q.dtype).reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4)
    outs = []
    for s0, e in query_blocks(t):
        n, keys = e - s0, s_cache + e
        qb = q[:, :, :, s0:e].reshape(b, kv, g * n, hd)  # row g*n + t
        s = jnp.einsum("bkqd,bskd->bkqs", qb, k[:, :keys], preferred_element_type=jnp.float32)
        m = jnp.tile(mask[:, s0:e, :keys], (1, g, 1))[:, None]
        p = jax.nn.softmax(jnp.where(m, s, _MASK_VALUE), axis=-1).astype(v.dtype)
        o = jnp.einsum("bkqs,bskd->bkqd", p, v[:, :keys])  # [B, KV, G*n, hd]
        outs.append(o.reshape(b, kv, g, n, hd))
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # [B, KV, G, T, hd]
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)


# ----------------------------------------------------------------------------- layer stack


# Activations the blocks tag with `jax.ad_checkpoint.checkpoint_name`, for remat policies:
# "k", "v": rotated keys / values; "mid": the residual stream between attention and MLP.
REMAT_POLICIES = ("none", "full", "attn", "dots")


def remat_policy(remat: str) -> Callable | None:
    """The `jax.checkpoint` policy of each block (None: no checkpointing).

    - "none": keep every activation the backward needs (fastest, ~70 MB per SmolLM2 block at
      4 x 256 tokens).
    - "full": keep only each block's input; the backward recomputes the block.
    - "attn": like "full", but also keep the keys, values and the residual stream after
      attention (~4 MB per block at 4 x 256 tokens): the recompute skips k/v, the o
      projection and everything the MLP's backward waits on.
    - "dots": keep every matmul output.
    """
    if remat == "none":
        return None
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "attn":
        return jax.checkpoint_policies.save_only_these_names("k", "v", "mid")
    if remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat: unknown policy {remat!r} ({', '.join(REMAT_POLICIES)})")


def run_layers(block: Callable, x: Array, layers: Any, xs_extra: Any = None, *,
               remat: str = "none", scan: bool = True) -> tuple[Array, Any]:
    """Apply `block(x, layer_params, extra) -> (x, y)` to each layer of a stacked tree.

    Every leaf of `layers` (and of `xs_extra`) has a leading layer axis L. With `scan=True` a
    single `lax.scan` runs the layers (compile time independent of depth); `scan=False` is a
    Python loop kept for tests. Returns the final x and the per-layer outputs stacked on L.
    """
    policy = remat_policy(remat)
    if policy is not None:
        block = jax.checkpoint(block, policy=policy, prevent_cse=not scan)

    def step(carry, inputs):
        lp, extra = inputs
        return block(carry, lp, extra)

    if scan:
        return jax.lax.scan(step, x, (layers, xs_extra))
    n = jax.tree.leaves(layers)[0].shape[0]
    ys = []
    for i in range(n):
        x, y = step(x, jax.tree.map(lambda a, i=i: a[i], (layers, xs_extra)))
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def run_cached_layers(block: Callable, x: Array, layers: Any, cache: KVCache | None, *,
                      xs: Any = None, remat: str = "none",
                      scan: bool = True) -> tuple[Array, Any]:
    """`run_layers` for decoder blocks that may read a KV cache.

    `block(x, layer_params, layer_kv, layer_xs) -> (x, (k, v))` where `layer_kv` is None or
    `(k_cache, v_cache)` of that layer (`[B, S, KV, hd]`; the mask is the caller's, from
    `cache_mask`) and `layer_xs` is the layer's slice of `xs` (per-layer flags, leading axis
    L, or None). Returns the final x and, with a cache, the new keys/values stacked on L (None
    without one).
    """
    if cache is None:
        return run_layers(lambda h, lp, e: (block(h, lp, None, e)[0], None), x, layers, xs,
                          remat=remat, scan=scan)
    return run_layers(lambda h, lp, e: block(h, lp, e[0], e[1]), x, layers,
                      ((cache.k, cache.v), xs), remat=remat, scan=scan)
