"""The Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2 (Touvron et al. 2023).

Pre-norm decoder: RMSNorm, rotary position embeddings (optionally Llama 3 scaled),
grouped-query attention (optional q/k/v bias for Qwen2), SwiGLU MLP (Shazeer 2020), tied or
untied LM head.

`FAMILY` is the architecture's record (`record.py`): `layout` / `init` define the parameter
structure of docs/DESIGN.md (every leaf under `layers/` stacked on a leading axis L), `TENSORS`
names each path in the checkpoint formats. `apply` is the pure forward over the nested dict, so
the same code runs on float arrays, `QTensor` leaves and `LoraWeight` views inside one
`lax.scan`: every projection and embedding goes through `jaxlora.lora.linear` / `embed` /
`attend`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora import lora
from jaxlora.models import common
from jaxlora.models.config import ModelConfig
from jaxlora.models.record import LM_HEAD, Family, Layout, TensorNames, init_layout

__all__ = ["FAMILY", "TENSORS", "layout", "init", "apply"]

Array = jax.Array
Params = dict[str, Any]


def _check(cfg: ModelConfig) -> None:
    if cfg.arch != "llama":
        raise ValueError(f"Llama: config arch is {cfg.arch!r}, expected 'llama'")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"Llama: num_heads {cfg.num_heads} is not a multiple of "
                         f"num_kv_heads {cfg.num_kv_heads}")


def _dense(path: str, n_in: int, n_out: int, bias: bool) -> Layout:
    out: Layout = {f"{path}/kernel": ("normal", (n_in, n_out))}
    if bias:
        out[f"{path}/bias"] = ("zeros", (n_out,))
    return out


def layout(cfg: ModelConfig) -> Layout:
    """Every parameter of `cfg`, in the order that fixes the random stream (`record.py`)."""
    d, v, f, b = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.attention_bias
    hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: Layout = {
        "embed/embedding": ("normal", (v, d)),
        "layers/attn_norm/scale": ("ones", (d,)),
        **_dense("layers/attn/q_proj", d, hq, b),
        **_dense("layers/attn/k_proj", d, hkv, b),
        **_dense("layers/attn/v_proj", d, hkv, b),
        **_dense("layers/attn/o_proj", hq, d, False),
        "layers/mlp_norm/scale": ("ones", (d,)),
        **_dense("layers/mlp/gate_proj", d, f, False),
        **_dense("layers/mlp/up_proj", d, f, False),
        **_dense("layers/mlp/down_proj", f, d, False),
        "final_norm/scale": ("ones", (d,)),
    }
    if not cfg.tie_embeddings:
        out[LM_HEAD] = ("normal", (d, v))
    return out


def init(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters: normal(0.02) kernels and embedding, zero biases, unit norm scales."""
    _check(cfg)
    return init_layout(layout(cfg), key, cfg.num_layers, dtype)


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


def _layer(path: str, hf: str, gguf: str, **kw: Any) -> TensorNames:
    return TensorNames(f"layers/{path}", f"model.layers.{{i}}.{hf}", f"blk.{{i}}.{gguf}", **kw)


# In the order a Hugging Face folder is written.
TENSORS: tuple[TensorNames, ...] = (
    TensorNames("embed/embedding", "model.embed_tokens.weight", "token_embd.weight"),
    TensorNames("final_norm/scale", "model.norm.weight", "output_norm.weight"),
    TensorNames(LM_HEAD, "lm_head.weight", "output.weight", peft="lm_head"),
    _layer("attn_norm/scale", "input_layernorm.weight", "attn_norm.weight"),
    _layer("mlp_norm/scale", "post_attention_layernorm.weight", "ffn_norm.weight"),
    _layer("attn/q_proj/kernel", "self_attn.q_proj.weight", "attn_q.weight", peft="q_proj",
           rope="q"),
    _layer("attn/k_proj/kernel", "self_attn.k_proj.weight", "attn_k.weight", peft="k_proj",
           rope="k"),
    _layer("attn/v_proj/kernel", "self_attn.v_proj.weight", "attn_v.weight", peft="v_proj"),
    _layer("attn/o_proj/kernel", "self_attn.o_proj.weight", "attn_output.weight", peft="o_proj"),
    _layer("attn/q_proj/bias", "self_attn.q_proj.bias", "attn_q.bias", rope="q"),
    _layer("attn/k_proj/bias", "self_attn.k_proj.bias", "attn_k.bias", rope="k"),
    _layer("attn/v_proj/bias", "self_attn.v_proj.bias", "attn_v.bias"),
    _layer("mlp/gate_proj/kernel", "mlp.gate_proj.weight", "ffn_gate.weight", peft="gate_proj"),
    _layer("mlp/up_proj/kernel", "mlp.up_proj.weight", "ffn_up.weight", peft="up_proj"),
    _layer("mlp/down_proj/kernel", "mlp.down_proj.weight", "ffn_down.weight", peft="down_proj"),
)

FAMILY = Family(
    arch="llama", init=init, apply=apply, tensors=TENSORS, embedding="embed/embedding",
    can_untie=True, learned_positions=False, hf_ignored=r"rotary_emb\.inv_freq$",
)
