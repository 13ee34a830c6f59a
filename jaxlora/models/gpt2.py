"""GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm, fused qkv, GELU (tanh) MLP.

Same two views as `llama.py`: the NNX module `GPT2` defines the parameter structure of
docs/DESIGN.md (blocks stacked by `nnx.vmap`), `apply` is the pure forward over the nested
dict, calling only `jaxlora.lora.linear` / `embed` / `attend` on parameter leaves. The LM head
is always tied to `wte`.
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

__all__ = ["GPT2", "apply", "head"]

Array = jax.Array
Params = dict[str, Any]

_INIT_STD = 0.02


def _dense(n_in: int, n_out: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=True, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)


def _ln(d: int, eps: float, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d, epsilon=eps, param_dtype=dtype, rngs=rngs)


class _Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.c_attn = _dense(d, 3 * d, dtype, rngs)
        self.c_proj = _dense(d, d, dtype, rngs)


class _MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.c_fc = _dense(d, f, dtype, rngs)
        self.c_proj = _dense(f, d, dtype, rngs)


class _Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.ln_1 = _ln(d, cfg.norm_eps, dtype, rngs)
        self.attn = _Attention(cfg, dtype, rngs)
        self.ln_2 = _ln(d, cfg.norm_eps, dtype, rngs)
        self.mlp = _MLP(cfg, dtype, rngs)


class GPT2(nnx.Module):
    """GPT-2 decoder as an NNX module (structure + initialization); see `Llama`."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if cfg.arch != "gpt2":
            raise ValueError(f"GPT2: config arch is {cfg.arch!r}, expected 'gpt2'")
        if cfg.num_heads * cfg.head_dim != cfg.hidden_size or cfg.num_kv_heads != cfg.num_heads:
            raise ValueError("GPT2: needs num_heads * head_dim == hidden_size and "
                             "num_kv_heads == num_heads")
        self.config = cfg
        d = cfg.hidden_size
        init = nnx.initializers.normal(_INIT_STD)
        self.wte = nnx.Embed(cfg.vocab_size, d, param_dtype=dtype, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(cfg.max_position_embeddings, d, param_dtype=dtype,
                             embedding_init=init, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> _Block:
            return _Block(cfg, dtype, rngs)

        self.layers = make_layers(rngs)
        self.ln_f = _ln(d, cfg.norm_eps, dtype, rngs)

    def params(self) -> Params:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens: Array, **kwargs: Any) -> Array:
        from jaxlora.models import forward

        return forward(self.config, self.params(), tokens, **kwargs)


def _block(cfg: ModelConfig, x: Array, p: Params, mask: Array,
           cache: tuple[Array, Array, Array] | None) -> tuple[Array, tuple[Array, Array]]:
    """One GPT-2 block. x: [B, T, d] -> ([B, T, d], (k, v) [B, T, H, hd])."""
    b, t, d = x.shape
    a = p["attn"]
    h = common.layer_norm(x, p["ln_1"]["scale"], p["ln_1"]["bias"], cfg.norm_eps)
    qkv = lora.linear(h, a["c_attn"]["kernel"], a["c_attn"]["bias"])  # [B, T, 3d]
    q, k, v = (z.reshape(b, t, cfg.num_heads, cfg.head_dim) for z in jnp.split(qkv, 3, axis=-1))
    k, v = checkpoint_name(k, "k"), checkpoint_name(v, "v")
    o = common.attention(q, k, v, mask, cache)  # [B, T, d]
    x = checkpoint_name(
        x + lora.linear(o, a["c_proj"]["kernel"], a["c_proj"]["bias"]).astype(x.dtype), "mid")
    m = p["mlp"]
    h = common.layer_norm(x, p["ln_2"]["scale"], p["ln_2"]["bias"], cfg.norm_eps)
    h = jax.nn.gelu(lora.linear(h, m["c_fc"]["kernel"], m["c_fc"]["bias"]), approximate=True)
    x = x + lora.linear(h, m["c_proj"]["kernel"], m["c_proj"]["bias"]).astype(x.dtype)
    return x, (k, v)


def apply(cfg: ModelConfig, params: Params, tokens: Array, positions: Array, mask: Array,
          cache: common.KVCache | None = None, *, compute_dtype: Any = jnp.float32,
          remat: str = "none", scan: bool = True) -> tuple[Array, tuple[Array, Array] | None]:
    """Embeddings + blocks + final LayerNorm; same contract as `llama.apply`."""
    x = (lora.embed(tokens, params["wte"]["embedding"], jnp.float32)
         + lora.embed(positions, params["wpe"]["embedding"], jnp.float32))  # [B, T, d]
    x = x.astype(compute_dtype)
    def block(x, lp, layer_cache):
        return _block(cfg, x, lp, mask, layer_cache)

    x, kv = common.run_cached_layers(block, x, params["layers"], cache, remat=remat, scan=scan)
    x = common.layer_norm(x, params["ln_f"]["scale"], params["ln_f"]["bias"], cfg.norm_eps)
    return x, kv


def head(cfg: ModelConfig, params: Params, hidden: Array) -> Array:
    """Tied LM head: float32 logits `[..., V]`."""
    return lora.attend(hidden, params["wte"]["embedding"]).astype(jnp.float32)
