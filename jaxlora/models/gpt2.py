"""GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm, fused qkv, GELU (tanh) MLP.

Same shape as `llama.py`: `FAMILY` is the record (`layout` / `init` give the parameter
structure of docs/DESIGN.md, blocks stacked on L; `TENSORS` the checkpoint names), `apply` the
pure forward over the nested dict, calling only `jaxlora.lora.linear` / `embed` / `attend` on
parameter leaves. The LM head is always tied to `wte`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora import lora
from jaxlora.models import common
from jaxlora.models.config import ModelConfig
from jaxlora.models.record import Family, Layout, TensorNames, init_layout

__all__ = ["FAMILY", "TENSORS", "layout", "init", "apply"]

Array = jax.Array
Params = dict[str, Any]


def _check(cfg: ModelConfig) -> None:
    if cfg.arch != "gpt2":
        raise ValueError(f"GPT2: config arch is {cfg.arch!r}, expected 'gpt2'")
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size or cfg.num_kv_heads != cfg.num_heads:
        raise ValueError("GPT2: needs num_heads * head_dim == hidden_size and "
                         "num_kv_heads == num_heads")


def _dense(path: str, n_in: int, n_out: int) -> Layout:
    return {f"{path}/kernel": ("normal", (n_in, n_out)), f"{path}/bias": ("zeros", (n_out,))}


def _ln(path: str, d: int) -> Layout:
    return {f"{path}/scale": ("ones", (d,)), f"{path}/bias": ("zeros", (d,))}


def layout(cfg: ModelConfig) -> Layout:
    """Every parameter of `cfg`, in the order that fixes the random stream (`record.py`)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "wte/embedding": ("normal", (cfg.vocab_size, d)),
        "wpe/embedding": ("normal", (cfg.max_position_embeddings, d)),
        **_ln("layers/ln_1", d),
        **_dense("layers/attn/c_attn", d, 3 * d),
        **_dense("layers/attn/c_proj", d, d),
        **_ln("layers/ln_2", d),
        **_dense("layers/mlp/c_fc", d, f),
        **_dense("layers/mlp/c_proj", f, d),
        **_ln("ln_f", d),
    }


def init(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters: normal(0.02) kernels and embeddings, zero biases, unit LN scales."""
    _check(cfg)
    return init_layout(layout(cfg), key, cfg.num_layers, dtype)


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
    cmask = None if cache is None else common.cache_mask(cache, tokens.shape[1])

    def block(x, lp, kv, _):
        return _block(cfg, x, lp, mask, None if kv is None else (*kv, cmask))

    x, kv = common.run_cached_layers(block, x, params["layers"], cache, remat=remat, scan=scan)
    x = common.layer_norm(x, params["ln_f"]["scale"], params["ln_f"]["bias"], cfg.norm_eps)
    return x, kv


def _layer(path: str, hf: str, gguf: str, peft: str | None = None) -> TensorNames:
    return TensorNames(f"layers/{path}", f"h.{{i}}.{hf}", f"blk.{{i}}.{gguf}", peft=peft)


def _layer_pair(path: str, hf: str, gguf: str, peft: str | None = None) -> tuple[TensorNames, ...]:
    """A Conv1D / LayerNorm: kernel or scale (`.weight`) and bias."""
    first = "scale" if path.startswith("ln_") else "kernel"
    return (_layer(f"{path}/{first}", f"{hf}.weight", f"{gguf}.weight", peft),
            _layer(f"{path}/bias", f"{hf}.bias", f"{gguf}.bias"))


# In the order a Hugging Face folder is written.
TENSORS: tuple[TensorNames, ...] = (
    TensorNames("wte/embedding", "wte.weight", "token_embd.weight"),
    TensorNames("wpe/embedding", "wpe.weight", "position_embd.weight"),
    TensorNames("ln_f/scale", "ln_f.weight", "output_norm.weight"),
    TensorNames("ln_f/bias", "ln_f.bias", "output_norm.bias"),
    *_layer_pair("ln_1", "ln_1", "attn_norm"),
    *_layer_pair("ln_2", "ln_2", "ffn_norm"),
    *_layer_pair("attn/c_attn", "attn.c_attn", "attn_qkv", peft="c_attn"),
    *_layer_pair("attn/c_proj", "attn.c_proj", "attn_output", peft="attn.c_proj"),
    *_layer_pair("mlp/c_fc", "mlp.c_fc", "ffn_up", peft="c_fc"),
    *_layer_pair("mlp/c_proj", "mlp.c_proj", "ffn_down", peft="mlp.c_proj"),
)

FAMILY = Family(
    arch="gpt2", init=init, apply=apply, tensors=TENSORS, embedding="wte/embedding",
    can_untie=False, learned_positions=True, hf_prefix="transformer.", hf_kernels_in_out=True,
    hf_ignored=r"\.attn\.(bias|masked_bias)$",
)
