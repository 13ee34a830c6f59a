"""The Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2 (Touvron et al. 2023).

Pre-norm decoder: RMSNorm, rotary position embeddings (optionally Llama 3 scaled),
grouped-query attention (optional q/k/v bias for Qwen2), SwiGLU MLP (Shazeer 2020), tied or
untied LM head.

Two views of one model:
- `Llama` (Flax NNX) owns the *structure and initialization*: its `nnx.Param` tree, read with
  `nnx.state(model, nnx.Param).to_pure_dict()`, has exactly the paths of docs/DESIGN.md, the
  blocks created by `nnx.vmap` so every leaf under `layers/` is stacked on a leading axis L.
- `apply` is the pure forward over such a nested dict. It never touches NNX, so the same code
  runs on float arrays, `QTensor` leaves and `LoraWeight` views inside one `lax.scan`: every
  projection and embedding goes through `jaxlora.lora.linear` / `embed` / `attend`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlora import lora
from jaxlora.models import common
from jaxlora.models.config import ModelConfig

__all__ = ["Llama", "apply", "head"]

Array = jax.Array
Params = dict[str, Any]

_INIT_STD = 0.02


def _dense(n_in: int, n_out: int, bias: bool, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)


class _Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        d, hd, b = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = _dense(d, cfg.num_heads * hd, b, dtype, rngs)
        self.k_proj = _dense(d, cfg.num_kv_heads * hd, b, dtype, rngs)
        self.v_proj = _dense(d, cfg.num_kv_heads * hd, b, dtype, rngs)
        self.o_proj = _dense(cfg.num_heads * hd, d, False, dtype, rngs)


class _MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _dense(d, f, False, dtype, rngs)
        self.up_proj = _dense(d, f, False, dtype, rngs)
        self.down_proj = _dense(f, d, False, dtype, rngs)


class _Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.attn_norm = nnx.RMSNorm(d, epsilon=cfg.norm_eps, param_dtype=dtype, rngs=rngs)
        self.attn = _Attention(cfg, dtype, rngs)
        self.mlp_norm = nnx.RMSNorm(d, epsilon=cfg.norm_eps, param_dtype=dtype, rngs=rngs)
        self.mlp = _MLP(cfg, dtype, rngs)


class Llama(nnx.Module):
    """Llama-family decoder as an NNX module (structure + initialization).

    `model.params()` returns the pure parameter dict; `model(tokens, **kw)` runs the
    functional `jaxlora.models.forward` on it (same keyword arguments).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if cfg.arch != "llama":
            raise ValueError(f"Llama: config arch is {cfg.arch!r}, expected 'llama'")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"Llama: num_heads {cfg.num_heads} is not a multiple of "
                             f"num_kv_heads {cfg.num_kv_heads}")
        self.config = cfg
        d = cfg.hidden_size
        self.embed = nnx.Embed(cfg.vocab_size, d, param_dtype=dtype,
                               embedding_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> _Block:
            return _Block(cfg, dtype, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = nnx.RMSNorm(d, epsilon=cfg.norm_eps, param_dtype=dtype, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(d, cfg.vocab_size, False, dtype, rngs)

    def params(self) -> Params:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens: Array, **kwargs: Any) -> Array:
        from jaxlora.models import forward

        return forward(self.config, self.params(), tokens, **kwargs)


def _block(cfg: ModelConfig, x: Array, p: Params, cos: Array, sin: Array, mask: Array,
           cache: tuple[Array, Array, Array] | None) -> tuple[Array, tuple[Array, Array]]:
    """One decoder block. x: [B, T, d] -> ([B, T, d], (k, v) [B, T, KV, hd])."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    a = p["attn"]
    h = common.rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
    q = lora.linear(h, a["q_proj"]["kernel"], a["q_proj"].get("bias"))
    k = lora.linear(h, a["k_proj"]["kernel"], a["k_proj"].get("bias"))
    v = lora.linear(h, a["v_proj"]["kernel"], a["v_proj"].get("bias"))
    q = common.apply_rope(q.reshape(b, t, cfg.num_heads, hd), cos, sin)  # [B, T, H, hd]
    k = checkpoint_name(common.apply_rope(k.reshape(b, t, cfg.num_kv_heads, hd), cos, sin), "k")
    v = checkpoint_name(v.reshape(b, t, cfg.num_kv_heads, hd), "v")
    o = common.attention(q, k, v, mask, cache)  # [B, T, H*hd]
    x = checkpoint_name(x + lora.linear(o, a["o_proj"]["kernel"]).astype(x.dtype), "mid")
    m = p["mlp"]
    h = common.rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps)
    g = lora.linear(h, m["gate_proj"]["kernel"])
    u = lora.linear(h, m["up_proj"]["kernel"])
    x = x + lora.linear(jax.nn.silu(g) * u, m["down_proj"]["kernel"]).astype(x.dtype)
    return x, (k, v)


def apply(cfg: ModelConfig, params: Params, tokens: Array, positions: Array, mask: Array,
          cache: common.KVCache | None = None, *, compute_dtype: Any = jnp.float32,
          remat: str = "none", scan: bool = True) -> tuple[Array, tuple[Array, Array] | None]:
    """Embeddings + all blocks + final norm on already-attached params.

    Args:
      tokens, positions: [B, T] int. mask: [B, T, T] bool among the new tokens.
      cache: earlier tokens' keys/values (read only here).
    Returns:
      (hidden [B, T, d] after the final norm, (k, v) [L, B, T, KV, hd] if cache else None).
    """
    x = lora.embed(tokens, params["embed"]["embedding"], compute_dtype)  # [B, T, d]
    inv_freq = common.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    cos, sin = common.rope_cos_sin(positions, inv_freq)  # [B, T, hd]
    def block(x, lp, layer_cache):
        return _block(cfg, x, lp, cos, sin, mask, layer_cache)

    x, kv = common.run_cached_layers(block, x, params["layers"], cache, remat=remat, scan=scan)
    x = common.rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
    return x, kv


def head(cfg: ModelConfig, params: Params, hidden: Array) -> Array:
    """LM head on final hidden states `[..., d]` -> float32 logits `[..., V]`."""
    if cfg.tie_embeddings:
        out = lora.attend(hidden, params["embed"]["embedding"])
    else:
        out = lora.linear(hidden, params["lm_head"]["kernel"])
    return out.astype(jnp.float32)
