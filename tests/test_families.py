"""Qwen3 and Gemma 3 on tiny random models: a float64 reference with the local/global mask
pattern, KV-cache decoding, loading both file formats, PEFT and merged exports."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_adapters, random_params

sys.path.insert(0, str(Path(__file__).parent))
from io_helpers import flat, tiny_gemma3, tiny_qwen3, write_gguf  # noqa: E402

from jaxlora import lora, models, quant  # noqa: E402
from jaxlora.generate import generate_tokens  # noqa: E402
from jaxlora.io import Tokenizer, load_model, save_hf  # noqa: E402
from jaxlora.io.hf import config_from_hf  # noqa: E402
from jaxlora.io.peft import load_peft, save_peft  # noqa: E402
from jaxlora.models import ModelConfig  # noqa: E402

QWEN3 = ModelConfig.tiny_qwen3()
GEMMA3 = ModelConfig.tiny_gemma3()  # window 4; layers 2 and 5 global
CFGS = {"qwen3": QWEN3, "gemma3": GEMMA3}


@functools.partial(jax.jit, static_argnames="cfg")
def jforward(cfg, params, tokens, adapters=None):
    return models.forward(cfg, params, tokens, adapters=adapters)


def ref_forward(cfg: ModelConfig, params, tokens, sliding=None) -> np.ndarray:
    """Float64 logits with explicit per-layer masks: causal, and i - j < window in the
    `sliding` layers (default: the config's), each kind with its own RoPE base."""
    sliding = cfg.sliding_layers if sliding is None else sliding
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    gemma = cfg.arch == "gemma3"
    b, t = tokens.shape
    hd, heads, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]

    def rms(x, s):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * ((1.0 if gemma else 0.0) + s)

    def rope(z, theta):  # rotate pairs (c, c + hd/2) by position * theta^(-2c/hd)
        ang = np.arange(t)[:, None] / theta ** (np.arange(0, hd, 2) / hd)  # [T, hd/2]
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
        return np.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], axis=-1)

    x = p["embed"]["embedding"][np.asarray(tokens)] * (math.sqrt(cfg.hidden_size) if gemma else 1.0)
    for layer in range(cfg.num_layers):
        lp = jax.tree.map(lambda a, k=layer: a[k], p["layers"])
        a = lp["attn"]
        local = layer in sliding
        allowed = (j <= i) & ((i - j < cfg.sliding_window) if local else True)
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        h = rms(x, lp["attn_norm"]["scale"])
        q = rms((h @ a["q_proj"]["kernel"]).reshape(b, t, heads, hd), a["q_norm"]["scale"])
        k = rms((h @ a["k_proj"]["kernel"]).reshape(b, t, kv, hd), a["k_norm"]["scale"])
        v = (h @ a["v_proj"]["kernel"]).reshape(b, t, kv, hd)
        q, k = rope(q, theta), rope(k, theta)
        o = np.zeros((b, t, heads, hd))
        for hh in range(heads):
            g = hh // (heads // kv)
            s = np.einsum("btd,bsd->bts", q[:, :, hh], k[:, :, g]) * cfg.attn_scale
            s = np.where(allowed, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            o[:, :, hh] = np.einsum("bts,bsd->btd", w / w.sum(-1, keepdims=True), v[:, :, g])
        o = o.reshape(b, t, heads * hd) @ a["o_proj"]["kernel"]
        x = x + (rms(o, lp["attn_post_norm"]["scale"]) if gemma else o)
        h = rms(x, lp["mlp_norm"]["scale"])
        gate, up = h @ lp["mlp"]["gate_proj"]["kernel"], h @ lp["mlp"]["up_proj"]["kernel"]
        act = (0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
               if gemma else gate / (1 + np.exp(-gate)))
        y = (act * up) @ lp["mlp"]["down_proj"]["kernel"]
        x = x + (rms(y, lp["mlp_post_norm"]["scale"]) if gemma else y)
    x = rms(x, p["final_norm"]["scale"])
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


def rel_err(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


def test_gemma3_structure_and_names():
    shapes = models.param_shapes(GEMMA3)
    L, d, hd = GEMMA3.num_layers, GEMMA3.hidden_size, GEMMA3.head_dim
    assert shapes["layers/attn/q_norm/scale"] == (L, hd)
    assert shapes["layers/attn_post_norm/scale"] == shapes["layers/mlp_post_norm/scale"] == (L, d)
    assert "lm_head/kernel" not in shapes and not any(p.endswith("bias") for p in shapes)
    init = models.init_params(GEMMA3, jax.random.key(0))
    assert not np.asarray(init["layers"]["attn_norm"]["scale"]).any()  # (1 + 0): identity
    assert models.llama.layout(QWEN3)["layers/attn/q_norm/scale"] == ("ones", (QWEN3.head_dim,))
    assert GEMMA3.sliding_layers == (0, 1, 3, 4)
    hf = {t.path: t.hf for t in models.family(GEMMA3).tensors}
    assert hf["layers/mlp_norm/scale"] == "model.layers.{i}.pre_feedforward_layernorm.weight"
    assert hf["layers/attn_post_norm/scale"] == "model.layers.{i}.post_attention_layernorm.weight"
    assert {t.path: t.hf for t in models.family(QWEN3).tensors}["layers/mlp_norm/scale"] == (
        "model.layers.{i}.post_attention_layernorm.weight")
    for cfg in (QWEN3, GEMMA3):  # the record is the one declaration of the structure
        fam = models.family(cfg)
        tree = jax.eval_shape(lambda c=cfg: models.init_params(c, jax.random.key(0)))
        assert fam.shapes(cfg) == {k: tuple(v.shape) for k, v in lora.flatten_paths(tree).items()}
        assert set(fam.shapes(cfg)) <= {t.path for t in fam.tensors}
        for column in ([t.hf for t in fam.tensors], [t.gguf for t in fam.tensors]):
            assert len(set(column)) == len(column)
    with pytest.raises(ValueError, match="gemma3: config arch is 'llama'"):
        models.gemma.FAMILY.init(QWEN3, jax.random.key(0))
    with pytest.raises(ValueError, match="tie_embeddings=True"):
        models.gemma.FAMILY.init(dataclasses.replace(GEMMA3, tie_embeddings=False), jax.random.key(0))


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_forward_matches_float64_reference_with_the_mask_pattern(name):
    cfg = CFGS[name]
    params = random_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)  # T > window
    got = np.asarray(jforward(cfg, params, tokens))
    assert rel_err(got, ref_forward(cfg, params, tokens)) < 2e-5
    if name == "gemma3":  # controls: the pattern and the window both change the logits
        assert rel_err(got, ref_forward(cfg, params, tokens, sliding=())) > 1e-2
        assert rel_err(got, ref_forward(cfg, params, tokens, sliding=(2, 5))) > 1e-2
        short = tokens[:, : cfg.sliding_window]  # the window masks nothing within it
        wide = dataclasses.replace(cfg, sliding_window=100)
        assert rel_err(jforward(cfg, params, short), ref_forward(wide, params, short)) < 2e-5


def test_window_mask_is_i_minus_j_below_window():
    pos = jnp.asarray([[0, 1, 2, 3, 4, 5]])
    causal = jnp.tril(jnp.ones((1, 6, 6), bool))
    got = np.asarray(models.common.window_mask(causal, pos, pos, 3))[0]
    want = np.array([[0 <= i - j < 3 for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_kv_cache_decoding_equals_full_forward(name):
    cfg = dataclasses.replace(CFGS[name], eos_token_id=None)
    params = random_params(cfg, 2, kernel_gain=3.0)
    if name == "gemma3":  # undo the sqrt(d) scale, or the tied head echoes the input token
        params["embed"]["embedding"] = params["embed"]["embedding"] / math.sqrt(cfg.hidden_size)
    toks = jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size)
    full = np.asarray(jforward(cfg, params, toks))
    step = jax.jit(functools.partial(models.decode_step, cfg))
    cache = models.init_cache(cfg, 2, 12)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    lg, cache = step(params, toks[:, :3], pos[:, :3], cache)  # prefill inside the window
    np.testing.assert_allclose(lg, full[:, 2], rtol=1e-5, atol=1e-4)
    for t in range(3, 10):  # keys leave the window of the local layers one by one
        lg, cache = step(params, toks[:, t : t + 1], pos[:, t : t + 1], cache)
        np.testing.assert_allclose(lg, full[:, t], rtol=1e-5, atol=1e-4)
    if name != "gemma3":
        return
    # left-padded rows generate what each prompt generates alone: the window follows each
    # row's positions, not its cache slots
    prompts = [[5, 17, 3, 9, 11, 2, 8], [9, 8], [100, 200, 50, 25]]
    batched = generate_tokens(cfg, params, prompts, max_new_tokens=6)
    assert batched == [generate_tokens(cfg, params, [p], max_new_tokens=6)[0] for p in prompts]
    assert len({tuple(o) for o in batched}) == 3


def _gguf_expected(cfg: ModelConfig, params) -> dict:
    """What a reader must return: Gemma's norms went through llama.cpp's +1 (float32)."""
    if cfg.arch != "gemma3":
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, w: (np.float32(w + np.float32(1)) - np.float32(1))
        if path[-1].key == "scale" else w, params)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_gguf_and_hf_load_what_was_written(tmp_path, name):
    cfg = {"qwen3": tiny_qwen3, "gemma3": tiny_gemma3}[name]()
    params = random_params(cfg, 4)
    meta = {"gemma3.attention.sliding_window_pattern": 3} if name == "gemma3" else None
    write_gguf(tmp_path / "m.gguf", cfg, params, metadata=meta)
    m = load_model(tmp_path / "m.gguf")
    assert m.config == cfg
    want = flat(_gguf_expected(cfg, params))
    for path, leaf in flat(m.params).items():
        np.testing.assert_array_equal(np.asarray(leaf), want[path], err_msg=path)
    assert sorted(flat(m.params)) == sorted(want)
    save_hf(tmp_path / "hf", cfg, m.params, m.tokenizer)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == [{"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[name]]
    back = load_model(tmp_path / "hf")
    assert back.config == dataclasses.replace(cfg, name=hf_cfg["_name_or_path"])
    for path, leaf in flat(back.params).items():
        np.testing.assert_array_equal(np.asarray(leaf), want[path], err_msg=path)
    # streaming quantize-on-load gives the tree quantize_tree gives the float model: the same
    # 4-bit codes (scales to float32 rounding: per-layer vs stacked programs)
    rules = quant.QuantRules(qtype="nf4", block_size=64)
    q = load_model(tmp_path / "m.gguf", quant=rules)
    qt, _ = quant.quantize_tree(m.params, rules)
    assert isinstance(q.params["layers"]["mlp"]["up_proj"]["kernel"], quant.QTensor)
    for path, leaf in flat(q.params).items():
        ref = flat(qt)[path]
        assert type(leaf) is type(ref), path
        for u, v in zip(jax.tree.leaves(leaf), jax.tree.leaves(ref), strict=True):
            if u.dtype == jnp.uint8:
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=path)
            else:
                np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, err_msg=path)


def test_hf_gemma3_configs_both_spellings():
    base = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 300, "hidden_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 16, "intermediate_size": 96, "sliding_window": 8, "rms_norm_eps": 1e-6,
            "query_pre_attn_scalar": 20}
    old = dict(base, sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    new = dict(base, layer_types=["sliding_attention", "full_attention"] * 2,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                   "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    a, b = config_from_hf(old)[0], config_from_hf(new)[0]
    assert a == b
    assert (a.arch, a.sliding_layers, a.sliding_window, a.rope_local_theta) == ("gemma3", (0, 2), 8, 1e4)
    assert a.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0} and a.attn_scale == 20**-0.5
    q = config_from_hf(dict(base, architectures=["Qwen3ForCausalLM"], rope_theta=1e6))[0]
    assert (q.arch, q.qk_norm, q.attention_bias, q.sliding_layers) == ("llama", True, False, ())


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_peft_round_trip_and_merged_export(tmp_path, name):
    cfg = CFGS[name]
    base = jax.tree.map(jnp.asarray, random_params(cfg, 5))
    spec = lora.LoraSpec(rank=2, alpha=4, targets="all-linear")
    ad = random_adapters(base, spec)
    save_peft(tmp_path / "peft", ad, spec, base_model_name="tiny", arch=cfg)
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    back = load_peft(tmp_path / "peft", base, cfg)
    for p, pair in lora.flatten_paths(ad).items():
        np.testing.assert_array_equal(np.asarray(lora.flatten_paths(back)[p].a), np.asarray(pair.a))
        np.testing.assert_array_equal(np.asarray(lora.flatten_paths(back)[p].b), np.asarray(pair.b))
    toks = jax.random.randint(jax.random.key(6), (1, 9), 0, cfg.vocab_size)
    with_ad = np.asarray(jforward(cfg, base, toks, ad))
    assert rel_err(with_ad, np.asarray(jforward(cfg, base, toks), np.float64)) > 1e-3  # control
    save_hf(tmp_path / "merged", cfg, lora.merge(base, ad), Tokenizer.byte_level())
    merged = load_model(tmp_path / "merged")
    np.testing.assert_allclose(np.asarray(jforward(merged.config, merged.params, toks)), with_ad,
                               rtol=0, atol=2e-4 * np.abs(with_ad).max())


def test_chat_generation_stops_at_gemma_end_of_turn(monkeypatch):
    from test_tokenizer import tiny_spm_meta

    from jaxlora import generate as gen

    tok = Tokenizer.from_gguf_metadata(tiny_spm_meta(), chat_template=models.gemma.CHAT_TEMPLATE)
    seen = {}

    def fake(cfg, params, ids, **kw):
        seen.update(ids=ids, eos=kw["eos_id"])
        return [[tok.token_to_id("a")]]

    monkeypatch.setattr(gen, "generate_tokens", fake)
    assert gen.generate(GEMMA3, {}, tok, ["hi"], chat=True) == ["a"]
    assert seen["eos"] == [1, tok.token_to_id("<end_of_turn>")] == [1, 5]
    assert seen["ids"][0][:2] == [2, 4]  # <bos><start_of_turn>, written by the template
    gen.generate(QWEN3, {}, tok, ["hi"])
    assert seen["eos"] == [1]  # a family without stop tokens: EOS only
