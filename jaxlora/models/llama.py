"""The Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2, Qwen3 (Touvron et al. 2023).

Pre-norm decoder: RMSNorm, rotary position embeddings (optionally Llama 3 scaled),
grouped-query attention (optional q/k/v bias for Qwen2, optional QK-norm for Qwen3: an RMSNorm
over each head's queries and keys before RoPE, Dehghani et al. 2023), SwiGLU MLP (Shazeer 2020),
tied or untied LM head.

The block is also Gemma 3's (`gemma.py`): a `Block` value switches on what Gemma adds, the
(1 + weight) RMSNorm, GeGLU, norms after attention and MLP, the sqrt(d) embedding scale, and
the config's sliding-window layers (each with its own RoPE base) work in any family member.

`FAMILY` is the architecture's record (`record.py`): `layout` / `init` define the parameter
structure of docs/DESIGN.md (every leaf under `layers/` stacked on a leading axis L), `TENSORS`
names each path in the checkpoint formats. `apply` is the pure forward over the nested dict, so
the same code runs on float arrays, `QTensor` leaves and `LoraWeight` views inside one
`lax.scan`: every projection and embedding goes through `jaxlora.lora.linear` / `embed` /
`attend`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora import lora
from jaxlora.models import common
from jaxlora.models.config import ModelConfig
from jaxlora.models.record import LM_HEAD, Family, Layout, TensorNames, hf_layer, init_layout

__all__ = ["FAMILY", "TENSORS", "Block", "LLAMA_BLOCK", "layout", "init", "apply"]

Array = jax.Array
Params = dict[str, Any]


class Block(NamedTuple):
    """What a decoder block does beyond Llama's; every field off is the Llama block."""

    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma stores w - 1
    gelu: bool = False  # GeGLU (tanh-approximate GELU gate) instead of SwiGLU
    sandwich: bool = False  # an RMSNorm on the attention and the MLP outputs too
    embed_scale: bool = False  # token embeddings multiplied by sqrt(d)


LLAMA_BLOCK = Block()


def check(cfg: ModelConfig, arch: str = "llama") -> None:
    """Refuse a config this block cannot run (wrong arch, heads that do not group)."""
    if cfg.arch != arch:
        raise ValueError(f"{arch}: config arch is {cfg.arch!r}, expected {arch!r}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"{arch}: num_heads {cfg.num_heads} is not a multiple of "
                         f"num_kv_heads {cfg.num_kv_heads}")


def _dense(path: str, n_in: int, n_out: int, bias: bool) -> Layout:
    out: Layout = {f"{path}/kernel": ("normal", (n_in, n_out))}
    if bias:
        out[f"{path}/bias"] = ("zeros", (n_out,))
    return out


def layout(cfg: ModelConfig, block: Block = LLAMA_BLOCK) -> Layout:
    """Every parameter of `cfg`, in the order that fixes the random stream (`record.py`).

    Norm scales start as the identity: ones, or zeros when the norm adds its offset.
    """
    d, v, f, b = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.attention_bias
    hd, hq, hkv = cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    unit = "zeros" if block.norm_offset else "ones"
    qk_norm: Layout = ({"layers/attn/q_norm/scale": (unit, (hd,)),
                        "layers/attn/k_norm/scale": (unit, (hd,))} if cfg.qk_norm else {})
    post = lambda name: {f"layers/{name}/scale": (unit, (d,))} if block.sandwich else {}
    out: Layout = {
        "embed/embedding": ("normal", (v, d)),
        "layers/attn_norm/scale": (unit, (d,)),
        **_dense("layers/attn/q_proj", d, hq, b),
        **_dense("layers/attn/k_proj", d, hkv, b),
        **_dense("layers/attn/v_proj", d, hkv, b),
        **qk_norm,
        **_dense("layers/attn/o_proj", hq, d, False),
        **post("attn_post_norm"),
        "layers/mlp_norm/scale": (unit, (d,)),
        **_dense("layers/mlp/gate_proj", d, f, False),
        **_dense("layers/mlp/up_proj", d, f, False),
        **_dense("layers/mlp/down_proj", f, d, False),
        **post("mlp_post_norm"),
        "final_norm/scale": (unit, (d,)),
    }
    if not cfg.tie_embeddings:
        out[LM_HEAD] = ("normal", (d, v))
    return out


def init(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters: normal(0.02) kernels and embedding, zero biases, unit norm scales."""
    check(cfg)
    return init_layout(layout(cfg), key, cfg.num_layers, dtype)


class _Attend(NamedTuple):
    """Per-layer-kind inputs of attention: RoPE tables and masks (global or local)."""

    cos: Array  # [B, T, hd]
    sin: Array
    mask: Array  # [B, T, T] among the new tokens
    cache_mask: Array | None  # [B, T, S] over the cache slots


def _select(local: Array | None, glob: _Attend, loc: _Attend | None) -> _Attend:
    """The layer's inputs: `loc` where the layer's (traced, per-layer) flag says sliding."""
    if local is None:
        return glob
    return jax.tree.map(lambda g, l_: jnp.where(local, l_, g), glob, loc)


def _block(cfg: ModelConfig, blk: Block, x: Array, p: Params, at: _Attend,
           kv: tuple[Array, Array] | None) -> tuple[Array, tuple[Array, Array]]:
    """One decoder block. x: [B, T, d] -> ([B, T, d], (k, v) [B, T, KV, hd])."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    norm = lambda h, s: common.rms_norm(h, s["scale"], cfg.norm_eps, blk.norm_offset)
    a = p["attn"]
    h = norm(x, p["attn_norm"])
    q = lora.linear(h, a["q_proj"]["kernel"], a["q_proj"].get("bias"))
    k = lora.linear(h, a["k_proj"]["kernel"], a["k_proj"].get("bias"))
    v = lora.linear(h, a["v_proj"]["kernel"], a["v_proj"].get("bias"))
    q = q.reshape(b, t, cfg.num_heads, hd)  # [B, T, H, hd]
    k = k.reshape(b, t, cfg.num_kv_heads, hd)  # [B, T, KV, hd]
    if cfg.qk_norm:
        q, k = norm(q, a["q_norm"]), norm(k, a["k_norm"])
    q = common.apply_rope(q, at.cos, at.sin)
    k = checkpoint_name(common.apply_rope(k, at.cos, at.sin), "k")
    v = checkpoint_name(v.reshape(b, t, cfg.num_kv_heads, hd), "v")
    cache = None if kv is None else (*kv, at.cache_mask)
    scale = None if cfg.query_pre_attn_scalar is None else cfg.attn_scale
    o = lora.linear(common.attention(q, k, v, at.mask, cache, scale), a["o_proj"]["kernel"])
    if blk.sandwich:
        o = norm(o, p["attn_post_norm"])
    x = checkpoint_name(x + o.astype(x.dtype), "mid")
    m = p["mlp"]
    h = norm(x, p["mlp_norm"])
    g = lora.linear(h, m["gate_proj"]["kernel"])
    u = lora.linear(h, m["up_proj"]["kernel"])
    g = jax.nn.gelu(g, approximate=True) if blk.gelu else jax.nn.silu(g)
    y = lora.linear(g * u, m["down_proj"]["kernel"])
    if blk.sandwich:
        y = norm(y, p["mlp_post_norm"])
    return x + y.astype(x.dtype), (k, v)


def _attend_inputs(cfg: ModelConfig, positions: Array, mask: Array,
                   cache: common.KVCache | None) -> tuple[_Attend, _Attend | None, Array | None]:
    """Global inputs, local (sliding-window) inputs and the per-layer sliding flags `[L]`."""
    inv = common.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    cmask = None if cache is None else common.cache_mask(cache, positions.shape[1])
    glob = _Attend(*common.rope_cos_sin(positions, inv), mask, cmask)  # cos/sin [B, T, hd]
    if not cfg.sliding_layers:
        return glob, None, None
    w = cfg.sliding_window
    inv_local = common.rope_inv_freq(cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta)
    loc = _Attend(*common.rope_cos_sin(positions, inv_local),
                  common.window_mask(mask, positions, positions, w),
                  None if cache is None else common.window_mask(cmask, positions,
                                                                cache.positions, w))
    flags = jnp.asarray([i in cfg.sliding_layers for i in range(cfg.num_layers)])
    return glob, loc, flags


def apply(cfg: ModelConfig, params: Params, tokens: Array, positions: Array, mask: Array,
          cache: common.KVCache | None = None, *, compute_dtype: Any = jnp.float32,
          remat: str = "none", scan: bool = True,
          block: Block = LLAMA_BLOCK) -> tuple[Array, tuple[Array, Array] | None]:
    """Embeddings + all blocks + final norm on already-attached params.

    Args:
      tokens, positions: [B, T] int. mask: [B, T, T] bool among the new tokens.
      cache: earlier tokens' keys/values (read only here).
      block: the family's block choices (`LLAMA_BLOCK`; Gemma 3 passes its own).
    Returns:
      (hidden [B, T, d] after the final norm, (k, v) [L, B, T, KV, hd] if cache else None).
    """
    x = lora.embed(tokens, params["embed"]["embedding"], compute_dtype)  # [B, T, d]
    if block.embed_scale:  # in the activations' dtype, as Gemma's reference does
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), x.dtype)
    glob, loc, flags = _attend_inputs(cfg, positions, mask, cache)

    def layer(x, lp, kv, local):
        return _block(cfg, block, x, lp, _select(local, glob, loc), kv)

    x, kv = common.run_cached_layers(layer, x, params["layers"], cache, xs=flags, remat=remat,
                                     scan=scan)
    x = common.rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps, block.norm_offset)
    return x, kv


# In the order a Hugging Face folder is written.
TENSORS: tuple[TensorNames, ...] = (
    TensorNames("embed/embedding", "model.embed_tokens.weight", "token_embd.weight"),
    TensorNames("final_norm/scale", "model.norm.weight", "output_norm.weight"),
    TensorNames(LM_HEAD, "lm_head.weight", "output.weight", peft="lm_head"),
    hf_layer("attn_norm/scale", "input_layernorm.weight", "attn_norm.weight"),
    hf_layer("mlp_norm/scale", "post_attention_layernorm.weight", "ffn_norm.weight"),
    hf_layer("attn/q_proj/kernel", "self_attn.q_proj.weight", "attn_q.weight", peft="q_proj",
           rope="q"),
    hf_layer("attn/k_proj/kernel", "self_attn.k_proj.weight", "attn_k.weight", peft="k_proj",
           rope="k"),
    hf_layer("attn/v_proj/kernel", "self_attn.v_proj.weight", "attn_v.weight", peft="v_proj"),
    hf_layer("attn/o_proj/kernel", "self_attn.o_proj.weight", "attn_output.weight", peft="o_proj"),
    hf_layer("attn/q_proj/bias", "self_attn.q_proj.bias", "attn_q.bias", rope="q"),
    hf_layer("attn/k_proj/bias", "self_attn.k_proj.bias", "attn_k.bias", rope="k"),
    hf_layer("attn/v_proj/bias", "self_attn.v_proj.bias", "attn_v.bias"),
    hf_layer("attn/q_norm/scale", "self_attn.q_norm.weight", "attn_q_norm.weight"),
    hf_layer("attn/k_norm/scale", "self_attn.k_norm.weight", "attn_k_norm.weight"),
    hf_layer("mlp/gate_proj/kernel", "mlp.gate_proj.weight", "ffn_gate.weight", peft="gate_proj"),
    hf_layer("mlp/up_proj/kernel", "mlp.up_proj.weight", "ffn_up.weight", peft="up_proj"),
    hf_layer("mlp/down_proj/kernel", "mlp.down_proj.weight", "ffn_down.weight", peft="down_proj"),
)

FAMILY = Family(
    arch="llama", init=init, apply=apply, tensors=TENSORS, embedding="embed/embedding",
    can_untie=True, learned_positions=False, hf_ignored=r"rotary_emb\.inv_freq$",
)
