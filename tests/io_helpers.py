"""Test helpers for jaxlora.io: tiny random models and tokenizers, written as GGUF or HF."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.io import permute_qk
from jaxlora.models import param_shapes
from jaxlora.models.config import ModelConfig

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "r e", "Ġ s"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_tokenizer_meta(pre: str = "smollm") -> dict[str, Any]:
    """GGUF tokenizer metadata for a small byte-level BPE: 3 specials, 256 bytes, 10 merges."""
    table = bytes_to_unicode()
    tokens = SPECIALS + [table[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


TINY_VOCAB = len(tiny_tokenizer_meta()["tokenizer.ggml.tokens"])  # 269


def tiny_llama(**kw: Any) -> ModelConfig:
    base = dict(
        vocab_size=TINY_VOCAB,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=2,
        norm_eps=1e-5,
    )
    base.update(kw)
    return ModelConfig.tiny_llama(**base)


def tiny_qwen3(**kw: Any) -> ModelConfig:
    base = dict(vocab_size=TINY_VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=2)
    base.update(kw)
    return ModelConfig.tiny_qwen3(**base)


def tiny_gemma3(**kw: Any) -> ModelConfig:
    """Tiny Gemma 3 as a GGUF can state it: scores scaled by head_dim ** -0.5."""
    base = dict(vocab_size=TINY_VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=2,
                query_pre_attn_scalar=16.0)
    base.update(kw)
    return ModelConfig.tiny_gemma3(**base)


def tiny_gpt2(**kw: Any) -> ModelConfig:
    base = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=2)
    base.update(kw)
    return ModelConfig.tiny_gpt2(**base)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Nested dict of float32 numpy arrays with the DESIGN.md paths and shapes of `cfg`."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for path, shape in param_shapes(cfg).items():
        scale = 1.0 if path.endswith("scale") else 0.5
        value = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- GGUF ------------------------------------------------------------------------------------
_LLAMA_NAMES = {
    "layers/attn_norm/scale": "attn_norm.weight",
    "layers/attn/q_proj/kernel": "attn_q.weight",
    "layers/attn/k_proj/kernel": "attn_k.weight",
    "layers/attn/v_proj/kernel": "attn_v.weight",
    "layers/attn/o_proj/kernel": "attn_output.weight",
    "layers/attn/q_proj/bias": "attn_q.bias",
    "layers/attn/k_proj/bias": "attn_k.bias",
    "layers/attn/v_proj/bias": "attn_v.bias",
    "layers/attn/q_norm/scale": "attn_q_norm.weight",
    "layers/attn/k_norm/scale": "attn_k_norm.weight",
    "layers/mlp_norm/scale": "ffn_norm.weight",
    "layers/mlp/gate_proj/kernel": "ffn_gate.weight",
    "layers/mlp/up_proj/kernel": "ffn_up.weight",
    "layers/mlp/down_proj/kernel": "ffn_down.weight",
    "embed/embedding": "token_embd.weight",
    "final_norm/scale": "output_norm.weight",
    "lm_head/kernel": "output.weight",
}
# llama.cpp's Gemma 3 names (convert_hf_to_gguf.py / gguf-py tensor_mapping.py).
_GEMMA3_NAMES = {
    **{k: v for k, v in _LLAMA_NAMES.items() if "bias" not in k and k != "lm_head/kernel"},
    "layers/attn_post_norm/scale": "post_attention_norm.weight",
    "layers/mlp_post_norm/scale": "post_ffw_norm.weight",
}
_GPT2_NAMES = {
    "wte/embedding": "token_embd.weight",
    "wpe/embedding": "position_embd.weight",
    "ln_f/scale": "output_norm.weight",
    "ln_f/bias": "output_norm.bias",
    "layers/ln_1/scale": "attn_norm.weight",
    "layers/ln_1/bias": "attn_norm.bias",
    "layers/attn/c_attn/kernel": "attn_qkv.weight",
    "layers/attn/c_attn/bias": "attn_qkv.bias",
    "layers/attn/c_proj/kernel": "attn_output.weight",
    "layers/attn/c_proj/bias": "attn_output.bias",
    "layers/ln_2/scale": "ffn_norm.weight",
    "layers/ln_2/bias": "ffn_norm.bias",
    "layers/mlp/c_fc/kernel": "ffn_up.weight",
    "layers/mlp/c_fc/bias": "ffn_up.bias",
    "layers/mlp/c_proj/kernel": "ffn_down.weight",
    "layers/mlp/c_proj/bias": "ffn_down.bias",
}


def gguf_tensors(cfg: ModelConfig, params: dict[str, Any], arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> numpy array in GGUF/torch layout ([out, in]), permuted like llama.cpp."""
    names = {"gpt2": _GPT2_NAMES, "gemma3": _GEMMA3_NAMES}.get(cfg.arch, _LLAMA_NAMES)
    out: dict[str, np.ndarray] = {}
    for path, w in flat(params).items():
        w = np.asarray(w, dtype=np.float32)
        if cfg.arch == "gemma3" and path.endswith("/scale"):
            w = w + np.float32(1.0)  # llama.cpp stores Gemma's norm weights as 1 + w
        gname = names[path]
        kernel = path.endswith("kernel")
        items = (
            [(f"blk.{i}.{gname}", w[i]) for i in range(w.shape[0])]
            if path.startswith("layers/")
            else [(gname, w)]
        )
        for name, x in items:
            if kernel:
                x = x.T  # [in, out] -> [out, in]
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                x = permute_qk(x, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
            out[name] = np.ascontiguousarray(x)
    if cfg.arch == "gpt2":
        out["output.weight"] = out["token_embd.weight"].copy()  # llama.cpp writes the tied copy
    return out


def write_gguf(
    path: str | Path,
    cfg: ModelConfig,
    params: dict[str, Any],
    *,
    arch: str | None = None,
    qtypes: dict[str, str] | None = None,
    tokenizer_meta: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Write `params` as a GGUF file the way llama.cpp's converter does.

    Args:
      arch: GGUF architecture ("llama", "qwen2", "gpt2"); default from cfg.
      qtypes: regex on the GGUF tensor name -> GGML type name ("Q8_0", "F16", ...); default F32.
      drop: GGUF tensor names to leave out; extra: tensors to add.
    Returns:
      GGUF name -> the values a reader should get back (dequantized, still [out, in]).
    """
    import re

    import gguf
    from gguf import GGMLQuantizationType as T

    arch = arch or (cfg.arch if cfg.arch in ("gpt2", "gemma3") else "qwen3" if cfg.qk_norm
                    else "qwen2" if cfg.attention_bias else "llama")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    if cfg.arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(cfg.vocab_size)
    w.add_name(cfg.name)
    meta = tiny_tokenizer_meta() if tokenizer_meta is None else tokenizer_meta
    if meta:
        w.add_tokenizer_model(meta["tokenizer.ggml.model"])
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
        w.add_token_list(meta["tokenizer.ggml.tokens"])
        w.add_token_types(meta["tokenizer.ggml.token_type"])
        w.add_token_merges(meta["tokenizer.ggml.merges"])
        w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
        w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
        w.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
        w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
        w.add_chat_template(meta["tokenizer.chat_template"])
    for k, v in (metadata or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, int(v))
    tensors = {k: v for k, v in gguf_tensors(cfg, params, arch).items() if k not in drop}
    tensors.update(extra or {})
    expect: dict[str, np.ndarray] = {}
    for name, x in tensors.items():
        qname = next((q for pat, q in (qtypes or {}).items() if re.search(pat, name)), "F32")
        qt = T[qname]
        if x.dtype != np.float32:  # raw non-float test tensors
            w.add_tensor(name, x)
            continue
        if qt == T.F32:
            w.add_tensor(name, x)
            expect[name] = x
        elif qt == T.F16:
            w.add_tensor(name, x.astype(np.float16))
            expect[name] = x.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(x, qt)
            w.add_tensor(name, q, raw_dtype=qt)
            expect[name] = gguf.quants.dequantize(q, qt).reshape(x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


def replace(cfg: ModelConfig, **kw: Any) -> ModelConfig:
    return dataclasses.replace(cfg, **kw)
