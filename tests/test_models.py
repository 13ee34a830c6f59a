"""Models: tiny random Llama / GPT-2 against float64 numpy references and exact properties."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from jaxlora import lora, models
from jaxlora.models import ModelConfig, common

LLAMA3_SCALING = (
    ("rope_type", "llama3"),
    ("factor", 8.0),
    ("low_freq_factor", 1.0),
    ("high_freq_factor", 4.0),
    ("original_max_position_embeddings", 1024),
)

CONFIGS = {
    "llama_gqa": ModelConfig.tiny_llama(),
    "llama_mha_untied": ModelConfig.tiny_llama(num_kv_heads=4, tie_embeddings=False),
    "qwen2_bias": ModelConfig.tiny_llama(attention_bias=True, rope_theta=1e6),
    "llama3_rope": ModelConfig.tiny_llama(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "gpt2": ModelConfig.tiny_gpt2(),
}


def param_shapes(cfg: ModelConfig) -> dict:
    """The init_params tree as ShapeDtypeStructs (traced, not compiled: fast)."""
    return jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))


def rand_params(cfg: ModelConfig, seed: int = 0) -> dict:
    return random_params(cfg, seed)


@functools.partial(
    jax.jit, static_argnames=("cfg", "remat", "scan_layers", "compute_dtype", "return_hidden")
)
def jforward(
    cfg,
    params,
    tokens,
    adapters=None,
    segment_ids=None,
    positions=None,
    dropout_key=None,
    remat="none",
    scan_layers=True,
    compute_dtype=jnp.float32,
    return_hidden=False,
):
    return models.forward(
        cfg,
        params,
        tokens,
        adapters=adapters,
        segment_ids=segment_ids,
        positions=positions,
        dropout_key=dropout_key,
        remat=remat,
        scan_layers=scan_layers,
        compute_dtype=compute_dtype,
        return_hidden=return_hidden,
    )


# ------------------------------------------------------------------ float64 numpy references


def ref_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies; Llama 3 scaling written as Meta's per-frequency loop."""
    hd = cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    sc = cfg.rope_scaling_dict
    if not sc:
        return freqs
    low_wl = sc["original_max_position_embeddings"] / sc["low_freq_factor"]
    high_wl = sc["original_max_position_embeddings"] / sc["high_freq_factor"]
    new = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            new.append(f)
        elif wl > low_wl:
            new.append(f / sc["factor"])
        else:
            s = (sc["original_max_position_embeddings"] / wl - sc["low_freq_factor"]) / (
                sc["high_freq_factor"] - sc["low_freq_factor"]
            )
            new.append((1 - s) * f / sc["factor"] + s * f)
    return np.array(new)


def _softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def _attention_f64(q, k, v, allowed):
    """Masked softmax attention, one head at a time in float64 (GQA: head h reads KV h // G)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, t, h, hd))
    for hh in range(h):
        s = np.einsum("btd,bsd->bts", q[:, :, hh], k[:, :, hh // g]) / math.sqrt(hd)
        out[:, :, hh] = np.einsum("bts,bsd->btd", _softmax(np.where(allowed, s, -np.inf)),
                                  v[:, :, hh // g])
    return out.reshape(b, t, h * hd)


def ref_forward(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None):
    """Per-layer, per-head float64 forward with explicit masked softmax attention."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    pos = np.broadcast_to(np.arange(t), (b, t)) if positions is None else np.asarray(positions)
    allowed = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        allowed &= seg[:, :, None] == seg[:, None, :]
    h_, kv_, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps = cfg.norm_eps

    def rms(x, s):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * s

    def ln(x, s, bias):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * s + bias

    def attn(q, k, v):  # q [B,T,H,hd], k/v [B,T,KV,hd]
        return _attention_f64(q, k, v, allowed)

    if cfg.arch == "gpt2":
        x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][pos]
        for i in range(cfg.num_layers):
            lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
            hn = ln(x, lp["ln_1"]["scale"], lp["ln_1"]["bias"])
            qkv = hn @ lp["attn"]["c_attn"]["kernel"] + lp["attn"]["c_attn"]["bias"]
            q, k, v = (z.reshape(b, t, h_, hd) for z in np.split(qkv, 3, axis=-1))
            x = x + attn(q, k, v) @ lp["attn"]["c_proj"]["kernel"] + lp["attn"]["c_proj"]["bias"]
            hn = ln(x, lp["ln_2"]["scale"], lp["ln_2"]["bias"])
            u = hn @ lp["mlp"]["c_fc"]["kernel"] + lp["mlp"]["c_fc"]["bias"]
            u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
            x = x + u @ lp["mlp"]["c_proj"]["kernel"] + lp["mlp"]["c_proj"]["bias"]
        x = ln(x, p["ln_f"]["scale"], p["ln_f"]["bias"])
        return x @ p["wte"]["embedding"].T

    ang = pos[..., None] * ref_inv_freq(cfg)  # [B, T, hd/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]

    def rope(z):  # rotate pairs (i, i + hd/2)
        z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
        return np.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], axis=-1)

    x = p["embed"]["embedding"][tokens]
    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        a = lp["attn"]
        hn = rms(x, lp["attn_norm"]["scale"])
        proj = {
            n: hn @ a[n]["kernel"] + a[n].get("bias", 0.0) for n in ("q_proj", "k_proj", "v_proj")
        }
        q = rope(proj["q_proj"].reshape(b, t, h_, hd))
        k = rope(proj["k_proj"].reshape(b, t, kv_, hd))
        v = proj["v_proj"].reshape(b, t, kv_, hd)
        x = x + attn(q, k, v) @ a["o_proj"]["kernel"]
        hn = rms(x, lp["mlp_norm"]["scale"])
        g = hn @ lp["mlp"]["gate_proj"]["kernel"]
        u = hn @ lp["mlp"]["up_proj"]["kernel"]
        x = x + (g / (1 + np.exp(-g)) * u) @ lp["mlp"]["down_proj"]["kernel"]
    x = rms(x, p["final_norm"]["scale"])
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


def rel_err(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


def tokens_for(cfg, b=2, t=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


# ------------------------------------------------------------------ structure


def test_param_paths_and_shapes_follow_design():
    L, d, v = 2, 64, 256
    got = {
        k: tuple(a.shape)
        for k, a in lora.flatten_paths(param_shapes(CONFIGS["qwen2_bias"])).items()
    }
    want = {
        "embed/embedding": (v, d),
        "final_norm/scale": (d,),
        "layers/attn_norm/scale": (L, d),
        "layers/mlp_norm/scale": (L, d),
        "layers/attn/q_proj/kernel": (L, d, 64),
        "layers/attn/q_proj/bias": (L, 64),
        "layers/attn/k_proj/kernel": (L, d, 32),
        "layers/attn/k_proj/bias": (L, 32),
        "layers/attn/v_proj/kernel": (L, d, 32),
        "layers/attn/v_proj/bias": (L, 32),
        "layers/attn/o_proj/kernel": (L, 64, d),
        "layers/mlp/gate_proj/kernel": (L, d, 128),
        "layers/mlp/up_proj/kernel": (L, d, 128),
        "layers/mlp/down_proj/kernel": (L, 128, d),
    }
    assert got == want
    untied = lora.flatten_paths(param_shapes(CONFIGS["llama_mha_untied"]))
    assert untied["lm_head/kernel"].shape == (d, v)
    assert not any(k.endswith("bias") for k in untied)
    g = {k: tuple(a.shape) for k, a in lora.flatten_paths(param_shapes(CONFIGS["gpt2"])).items()}
    assert g == {
        "wte/embedding": (v, d),
        "wpe/embedding": (128, d),
        "layers/ln_1/scale": (L, d),
        "layers/ln_1/bias": (L, d),
        "layers/attn/c_attn/kernel": (L, d, 3 * d),
        "layers/attn/c_attn/bias": (L, 3 * d),
        "layers/attn/c_proj/kernel": (L, d, d),
        "layers/attn/c_proj/bias": (L, d),
        "layers/ln_2/scale": (L, d),
        "layers/ln_2/bias": (L, d),
        "layers/mlp/c_fc/kernel": (L, d, 256),
        "layers/mlp/c_fc/bias": (L, 256),
        "layers/mlp/c_proj/kernel": (L, 256, d),
        "layers/mlp/c_proj/bias": (L, d),
        "ln_f/scale": (d,),
        "ln_f/bias": (d,),
    }


def test_init_params_dtype_and_layers_differ():
    p = models.init_params(CONFIGS["llama_gqa"], jax.random.key(0), dtype=jnp.bfloat16)
    q = p["layers"]["attn"]["q_proj"]["kernel"]
    assert q.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(q[0], np.float32), np.asarray(q[1], np.float32))
    assert np.array_equal(np.asarray(p["final_norm"]["scale"], np.float32), np.ones(64))


def test_family_records_define_the_param_structure():
    """Each family's initializer is the one declaration of its structure: the record's shapes
    are those of `init_params`, every path has an HF and a GGUF name, and an initializer
    refuses a config of another architecture."""
    for name, cfg in CONFIGS.items():
        fam = models.family(cfg)
        want = {k: tuple(a.shape) for k, a in lora.flatten_paths(param_shapes(cfg)).items()}
        assert fam.shapes(cfg) == models.param_shapes(cfg) == want, name
        names = {t.path for t in fam.tensors}
        assert set(want) <= names, (name, set(want) - names)
        for field in ("hf", "gguf"):
            column = [getattr(t, field) for t in fam.tensors]
            assert len(set(column)) == len(column), (name, field)
    assert models.family("gpt2") is models.family(CONFIGS["gpt2"]) is models.gpt2.FAMILY
    with pytest.raises(ValueError, match="arch"):
        models.gpt2.FAMILY.init(CONFIGS["llama_gqa"], jax.random.key(0))
    with pytest.raises(ValueError, match="arch"):
        models.llama.FAMILY.init(CONFIGS["gpt2"], jax.random.key(0))


# sha256 (first 128 bits) over (path, bytes) of init_params(cfg, key(seed)) as the Flax NNX
# modules of earlier versions made them: the layout initializer keeps their random stream, so
# seeds give the same models (and run directories' base.json fingerprints stay valid). CPU.
_NNX_INIT_DIGESTS = {
    ("llama_gqa", "float32", 0): "33041a8c4e454e5c0137acc9879be3ee",
    ("llama_gqa", "bfloat16", 3): "878313bfc8c737c15519b264353c3a9e",
    ("llama_mha_untied", "float32", 0): "da599dea88e1d7c9ae8d0abf23d8df57",
    ("qwen2_bias", "float32", 3): "b664b416d0a26954ed2e1877ca87ec94",
    ("gpt2", "float32", 0): "bf2f6ad45d242831506a738283f34b91",
    ("gpt2", "bfloat16", 3): "9de3d41859f773af2fac4305d2b51aea",
}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="digests recorded on CPU")
@pytest.mark.parametrize("name,dtype,seed", list(_NNX_INIT_DIGESTS))
def test_init_params_keeps_the_nnx_random_stream(name, dtype, seed):
    import hashlib

    flat = lora.flatten_paths(models.init_params(CONFIGS[name], jax.random.key(seed), dtype=dtype))
    h = hashlib.sha256()
    for k in sorted(flat):
        h.update(k.encode())
        h.update(np.asarray(flat[k]).tobytes())
    assert h.hexdigest()[:32] == _NNX_INIT_DIGESTS[name, dtype, seed]


def test_init_layout_stream_and_checks():
    """Top-level leaves draw fold_in(key, index); the blocks one split key per layer."""
    from jaxlora.models.record import INIT_STD, init_layout

    key = jax.random.key(7)
    layout = {"a": ("normal", (3,)), "layers/w": ("ones", (2,)), "layers/k": ("normal", (4,)),
              "b": ("zeros", (1,))}
    p = init_layout(layout, key, 2, jnp.float32)
    normal = jax.nn.initializers.normal(INIT_STD)
    np.testing.assert_array_equal(p["a"], normal(jax.random.fold_in(key, 0), (3,)))
    layer_keys = jax.random.split(jax.random.fold_in(key, 1), 2)
    for i in range(2):
        np.testing.assert_array_equal(p["layers"]["k"][i],
                                      normal(jax.random.fold_in(layer_keys[i], 1), (4,)))
    assert p["layers"]["w"].shape == (2, 2) and p["b"].shape == (1,)
    with pytest.raises(ValueError, match="not contiguous"):
        init_layout({"layers/w": ("ones", (2,)), "b": ("ones", (1,)),
                     "layers/v": ("ones", (2,))}, key, 2, jnp.float32)
    with pytest.raises(ValueError, match="unknown initializer"):
        init_layout({"a": ("uniform", (2,))}, key, 2, jnp.float32)


def test_head_adapters_are_the_adapters_the_logits_read():
    """`head_adapters` keeps exactly the adapters of the head's paths: the tied embedding or
    lm_head, never the blocks' or (GPT-2) the position table's."""
    spec = lora.LoraSpec(rank=2, targets=r"kernel$|embedding$")
    for name, head in (("llama_gqa", "embed/embedding"), ("llama_mha_untied", "lm_head/kernel"),
                       ("gpt2", "wte/embedding")):
        cfg = CONFIGS[name]
        ad = lora.init(jax.random.key(0), param_shapes(cfg), spec)
        assert len(lora.flatten_paths(ad)) > 2
        assert list(lora.flatten_paths(models.head_adapters(cfg, ad))) == [head]
        assert models.family(cfg).head_paths(cfg) == (head,)
    assert models.head_adapters(CONFIGS["gpt2"], None) is None
    only_layers = lora.init(jax.random.key(0), param_shapes(CONFIGS["gpt2"]),
                            lora.LoraSpec(targets=("c_attn",)))
    assert models.head_adapters(CONFIGS["gpt2"], only_layers) == {}


def test_head_adapters_carry_the_whole_logits_gradient():
    """The adapters outside `head_adapters` get no gradient from `logits` (so the loss may pull
    the logits' gradient back through the head adapters alone)."""
    spec = lora.LoraSpec(rank=2, targets=r"kernel$|embedding$", init="gaussian")
    for name in ("llama_gqa", "llama_mha_untied", "gpt2"):
        cfg = CONFIGS[name]
        params = rand_params(cfg)
        ad = lora.init(jax.random.key(1), params, spec)
        ad = jax.tree.map(lambda x: x + 0.1, ad)  # B != 0: every adapter changes the output
        hidden = jax.random.normal(jax.random.key(2), (3, cfg.hidden_size))

        def f(a, cfg=cfg, params=params, hidden=hidden):
            return jnp.sum(models.logits(cfg, params, hidden, a) ** 2)

        grads = jax.grad(f)(ad)
        heads = set(lora.flatten_paths(models.head_adapters(cfg, ad)))
        for path, g in lora.flatten_paths(grads).items():
            norm = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g))
            assert (norm > 0) == (path in heads), (name, path)


# ------------------------------------------------------------------ numerics vs float64


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_float64_reference(name):
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    toks = tokens_for(cfg)
    positions = None
    if name == "llama3_rope":  # large positions so every frequency band matters
        positions = jnp.asarray(np.random.default_rng(0).integers(0, 6000, (2, 12)))
    got = jforward(cfg, params, toks, positions=positions)
    assert got.dtype == jnp.float32 and got.shape == (2, 12, cfg.vocab_size)
    ref = ref_forward(cfg, params, toks, positions=positions)
    assert rel_err(got, ref) < 2e-5


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_long_sequences_match_float64_reference(name):
    """120 tokens: two causal query blocks of attention (64, 56), packed documents."""
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    toks = tokens_for(cfg, 2, 120, seed=3)
    seg = jnp.asarray([[1] * 80 + [2] * 40, [1] * 120])
    assert common.query_blocks(120) == [(0, 64), (64, 120)]
    got = jforward(cfg, params, toks, segment_ids=seg)
    pos = common.positions_from_segments(seg)
    assert rel_err(got, ref_forward(cfg, params, toks, positions=pos, segment_ids=seg)) < 2e-5


def test_query_blocks_cover_the_tokens_in_order():
    for t in (1, 63, 64, 65, 256, 1000, 2048, 5000):
        blocks = common.query_blocks(t)
        assert blocks[0][0] == 0 and blocks[-1][1] == t and len(blocks) <= 32
        assert all(a[1] == b[0] for a, b in zip(blocks[:-1], blocks[1:], strict=True))
        assert all(e - s0 >= 64 for s0, e in blocks[:-1])


def test_blocked_attention_with_cache_and_window_matches_float64():
    """Queries in three blocks over a 7-slot cache (2 slots empty), a sliding window and
    packed segments: values against float64 and gradients against one unblocked softmax."""
    b, t, s, h, kv, hd = 2, 150, 7, 6, 2, 8
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (b, t, h, hd))
    k, v = (jax.random.normal(x, (b, t, kv, hd)) for x in ks[1:3])
    kc, vc = (jax.random.normal(x, (b, s, kv, hd)) for x in ks[3:5])
    seg = jnp.asarray([[1] * 90 + [2] * 60, [1] * 150])
    pos = jnp.arange(s, s + t)[None].repeat(b, 0)
    mask = common.window_mask(common.new_token_mask(b, t, seg), pos, pos, 40)
    valid = jnp.asarray([[True] * 5 + [False] * 2] * b)
    cmask = jnp.broadcast_to(valid[:, None, :], (b, t, s))
    allowed = np.concatenate([np.asarray(cmask), np.asarray(mask)], -1)  # [B, T, S + T]
    got = common.attention(q, k, v, mask, (kc, vc, cmask))
    full_k, full_v = jnp.concatenate([kc, k], 1), jnp.concatenate([vc, v], 1)
    ref = _attention_f64(q, full_k, full_v, allowed)
    assert rel_err(got, ref) < 1e-5

    def unblocked(q, k, v):  # the same math as one block: every key, masked
        g = h // kv
        sc = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, g, axis=2)) / math.sqrt(hd)
        p = jax.nn.softmax(jnp.where(allowed[:, None], sc, -jnp.inf), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v, g, axis=2)).reshape(b, t, h * hd)

    w = jax.random.normal(ks[5], (b, t, h * hd))
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))  # noqa: E731
    blocked = lambda q, k, v: common.attention(q, k[:, s:], v[:, s:], mask,  # noqa: E731
                                               (k[:, :s], v[:, :s], cmask))
    want = jax.grad(loss(unblocked), argnums=(0, 1, 2))(q, full_k, full_v)
    for a, r in zip(jax.grad(loss(blocked), argnums=(0, 1, 2))(q, full_k, full_v), want,
                    strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_llama3_rope_inv_freq_matches_formula():
    cfg = CONFIGS["llama3_rope"]
    got = np.asarray(common.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict))
    ref = ref_inv_freq(cfg)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    plain = 1.0 / cfg.rope_theta ** (np.arange(0, 16, 2) / 16)
    ratio = ref / plain  # all three regimes are exercised: kept, smoothed, divided by factor
    assert np.isclose(ratio[0], 1.0) and np.isclose(ratio[-1], 1 / 8)
    assert np.any((ratio < 0.99) & (ratio > 1 / 8 + 1e-3))


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_scan_equals_unrolled(name):
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    toks = tokens_for(cfg)
    np.testing.assert_allclose(
        jforward(cfg, params, toks, scan_layers=False),
        jforward(cfg, params, toks),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_remat_variants_equal_values_and_gradients(name):
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    toks = tokens_for(cfg)

    def loss(p, remat):
        lg = models.forward(cfg, p, toks, remat=remat)
        return jnp.mean(jax.nn.log_softmax(lg)[..., 0])

    grads = {r: jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r)
             for r in common.REMAT_POLICIES}
    for r in common.REMAT_POLICIES[1:]:
        np.testing.assert_allclose(grads[r][0], grads["none"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads[r][1]), jax.tree.leaves(grads["none"][1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat"):
        models.forward(cfg, params, toks, remat="some")


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_remat_attn_keeps_keys_values_and_the_mid_residual(name):
    """What each policy keeps for the backward: the residuals of `jax.vjp`, stacked over L."""
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    toks = tokens_for(cfg)
    (b, t), nl = toks.shape, cfg.num_layers

    def kept(remat):
        _, pull = jax.vjp(lambda p: models.forward(cfg, p, toks, remat=remat), params)
        shapes = [leaf.shape for leaf in jax.tree.leaves(pull)]
        return (shapes.count((nl, b, t, cfg.hidden_size)),
                shapes.count((nl, b, t, cfg.num_kv_heads, cfg.head_dim)))

    full, attn = kept("full"), kept("attn")
    assert full == (1, 0)  # the block inputs only
    assert attn == (2, 2)  # + the residual after attention; + keys and values


def test_remat_policies_match_the_config_choices():
    from jaxlora.config import ModelSection

    field = {f.name: f for f in dataclasses.fields(ModelSection)}["remat"]
    assert tuple(field.metadata["choices"]) == common.REMAT_POLICIES


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_packed_segments_equal_separate_documents(name):
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    doc1 = np.asarray(tokens_for(cfg, 1, 7, seed=4))[0]
    doc2 = np.asarray(tokens_for(cfg, 1, 5, seed=5))[0]
    pad = np.zeros(12 - 5, np.int32)
    # row 0: [doc1; doc2] packed. Rows 1, 2: each document alone at the start of a row (what
    # follows it cannot influence it: causal). One call, one compile.
    toks = jnp.asarray(
        np.stack(
            [
                np.concatenate([doc1, doc2]),
                np.concatenate([doc1, pad[:5]]),
                np.concatenate([doc2, pad]),
            ]
        )
    )
    seg = jnp.asarray([[1] * 7 + [2] * 5, [1] * 12, [1] * 12])
    got = np.asarray(jforward(cfg, params, toks, segment_ids=seg))  # positions from segments
    np.testing.assert_allclose(got[0, :7], got[1, :7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0, 7:], got[2, :5], rtol=1e-5, atol=1e-5)
    # the float64 reference with the same mask and restarted positions
    pos = [list(range(7)) + list(range(5))]
    ref = ref_forward(cfg, params, toks[:1], positions=pos, segment_ids=seg[:1])
    assert rel_err(got[:1], ref) < 2e-5
    # without the segment mask the second document would see the first
    leaky = ref_forward(cfg, params, toks[:1], positions=pos)
    assert rel_err(leaky[:, 7:], ref[:, 7:]) > 1e-2


def test_positions_from_segments():
    seg = jnp.asarray([[3, 3, 3, 1, 1, 0, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(
        common.positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    )


@pytest.mark.parametrize("name", ["llama_mha_untied", "gpt2"])
def test_return_hidden_then_logits_equals_forward(name):
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    toks = tokens_for(cfg)
    hidden = jforward(cfg, params, toks, return_hidden=True)
    assert hidden.shape == (2, 12, cfg.hidden_size)
    np.testing.assert_allclose(
        models.logits(cfg, params, hidden), jforward(cfg, params, toks), rtol=1e-5, atol=1e-5
    )


def test_bfloat16_compute_is_close_and_logits_float32():
    cfg = CONFIGS["llama_gqa"]
    params = rand_params(cfg)
    toks = tokens_for(cfg)
    got = jforward(cfg, params, toks, compute_dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32
    assert rel_err(got, ref_forward(cfg, params, toks)) < 5e-2


# ------------------------------------------------------------------ LoRA and quantized leaves


def _adapters(cfg, params, paths, seed, zero_b):
    rng = np.random.default_rng(seed)
    flat = lora.flatten_paths(params)
    out = {}
    for path in paths:
        w = flat[path]
        lead, n_in, n_out = w.shape[:-2], w.shape[-2], w.shape[-1]
        a = rng.standard_normal((*lead, n_in, 4)) / math.sqrt(n_in)
        b = np.zeros((*lead, 4, n_out)) if zero_b else 0.3 * rng.standard_normal((*lead, 4, n_out))
        out[path] = lora.LoraPair(
            jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), scale=2.0, dropout=0.1
        )
    return lora.unflatten_paths(out)


def _merged(params, adapters):
    flat = lora.flatten_paths(params)
    for path, pr in lora.flatten_paths(adapters).items():
        flat[path] = flat[path] + pr.scale * jnp.einsum("...ir,...ro->...io", pr.a, pr.b)
    return lora.unflatten_paths(flat)


LLAMA_TARGETS = [
    "layers/attn/q_proj/kernel",
    "layers/attn/v_proj/kernel",
    "layers/mlp/down_proj/kernel",
    "lm_head/kernel",
    "embed/embedding",
]
GPT2_TARGETS = ["layers/attn/c_attn/kernel", "layers/mlp/c_fc/kernel", "wte/embedding"]


@pytest.mark.parametrize(
    "name,targets", [("llama_mha_untied", LLAMA_TARGETS), ("gpt2", GPT2_TARGETS)]
)
def test_adapters_zero_b_is_base_and_nonzero_equals_merged(name, targets):
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    toks = tokens_for(cfg)
    base = jforward(cfg, params, toks)
    zero = _adapters(cfg, params, targets, 0, zero_b=True)
    np.testing.assert_array_equal(jforward(cfg, params, toks, adapters=zero), base)
    # with a dropout key, zero B still gives the base exactly (dropout only feeds A @ B)
    np.testing.assert_array_equal(
        jforward(cfg, params, toks, adapters=zero, dropout_key=jax.random.key(0)), base
    )
    ad = _adapters(cfg, params, targets, 1, zero_b=False)
    got = jforward(cfg, params, toks, adapters=ad)
    want = jforward(cfg, _merged(params, ad), toks)
    assert rel_err(got, np.asarray(want, np.float64)) < 1e-5
    assert rel_err(got, np.asarray(base, np.float64)) > 1e-2  # the adapters do something
    dropped = jforward(cfg, params, toks, adapters=ad, dropout_key=jax.random.key(0))
    assert not np.allclose(dropped, got, atol=1e-4)  # dropout is applied in training mode


def test_quantized_params_run_and_match_dequantized():
    from jaxlora import quant

    name = "llama_gqa"
    cfg = CONFIGS[name]
    params = rand_params(cfg)
    qparams, _ = quant.quantize_tree(params)
    qleaves = [p for p, v in lora.flatten_paths(qparams).items() if isinstance(v, quant.QTensor)]
    assert any(p.startswith("layers/") for p in qleaves)
    deq = jax.tree.map(
        lambda v: quant.dequantize(v) if isinstance(v, quant.QTensor) else v,
        qparams,
        is_leaf=lambda v: isinstance(v, quant.QTensor),
    )
    toks = tokens_for(cfg)
    got = jforward(cfg, qparams, toks)
    np.testing.assert_allclose(got, jforward(cfg, deq, toks), rtol=1e-4, atol=1e-4)
    # 4-bit weights: close to the float model, not equal
    err = rel_err(got, np.asarray(jforward(cfg, params, toks), np.float64))
    assert 1e-4 < err < 0.5
    # LoRA on a quantized base, inside the scan
    ad = _adapters(
        cfg,
        params,
        ["layers/mlp/c_fc/kernel" if name == "gpt2" else "layers/mlp/up_proj/kernel"],
        2,
        zero_b=False,
    )
    got_ad = jforward(cfg, qparams, toks, adapters=ad)
    assert rel_err(got_ad, np.asarray(jforward(cfg, _merged(deq, ad), toks), np.float64)) < 1e-4


def test_config_errors():
    bad = dataclasses.replace(CONFIGS["llama_gqa"], arch="t5")
    with pytest.raises(ValueError, match="arch"):
        models.init_params(bad, jax.random.key(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        models.init_params(ModelConfig.tiny_llama(num_kv_heads=3), jax.random.key(0))
    with pytest.raises(ValueError, match="rope_type"):
        common.rope_inv_freq(16, 1e4, {"rope_type": "yarn"})
    with pytest.raises(ValueError, match="learned positions"):
        models.forward(CONFIGS["gpt2"], param_shapes(CONFIGS["gpt2"]), jnp.zeros((1, 129), int))
