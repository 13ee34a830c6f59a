"""Tests for jaxlora.lora: the primitive, spec/targets, init, merge, NNX binding."""

import dataclasses
import math
import zlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora import lora, quant
from jaxlora.lora import LoraPair, LoraSpec, LoraWeight

L, D, F, V = 2, 64, 128, 50
QV = ("q_proj", "v_proj")  # LoraSpec's targets default before it became "all-linear"


def rnd(seed, shape):
    """Standard-normal float32 test data from numpy (no per-shape JAX RNG compiles)."""
    rng = np.random.default_rng(zlib.crc32(str(seed).encode()))
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def tiny_base(seed=0, dtype=np.float32):
    """A tiny Llama-layout tree (stacked layers, embeddings, lm_head); numpy RNG keeps the
    test data free of per-shape JAX compiles."""
    rng = np.random.default_rng(seed)
    n = lambda shape: jnp.asarray(rng.standard_normal(shape) / math.sqrt(shape[-2]), dtype)
    return {
        "embed": {"embedding": jnp.asarray(rng.standard_normal((V, D)), dtype)},
        "layers": {
            "attn": {
                "q_proj": {"kernel": n((L, D, D))},
                "v_proj": {"kernel": n((L, D, D)), "bias": jnp.zeros((L, D), dtype)},
                "o_proj": {"kernel": n((L, D, D))},
            },
            "mlp": {"up_proj": {"kernel": n((L, D, F))}, "down_proj": {"kernel": n((L, F, D))}},
            "attn_norm": {"scale": jnp.ones((L, D), dtype)},
        },
        "final_norm": {"scale": jnp.ones((D,), dtype)},
        "lm_head": {"kernel": n((D, V))},
    }


def randomize(adapters, seed=1, std=0.1):
    """Non-zero A and B so the LoRA term matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), adapters
    )


def f64(x):
    return np.asarray(x, np.float64)


def relerr(x, ref):
    return float(np.max(np.abs(f64(x) - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------- the primitive


def test_linear_matches_float64_reference_and_zero_b_is_exact():
    x = rnd("k1", (3, 5, D))
    w = rnd("k2", (D, F))
    a = rnd("k3", (D, 4))
    b = rnd("k4", (4, F))
    bias = jnp.arange(F, dtype=jnp.float32)
    y = jax.jit(lora.linear)(x, LoraWeight(w, a, b, scale=0.5), bias)
    ref = f64(x) @ f64(w) + 0.5 * (f64(x) @ f64(a)) @ f64(b) + f64(bias)
    assert y.shape == (3, 5, F) and relerr(y, ref) < 1e-5
    # B = 0 reproduces the base bit for bit.
    y0 = jax.jit(lora.linear)(x, LoraWeight(w, a, jnp.zeros_like(b), scale=0.5), bias)
    np.testing.assert_array_equal(y0, jax.jit(lora.linear)(x, w, bias))


@pytest.mark.parametrize("quantized", [False, True])
def test_linear_gradients_match_float64_formulas(quantized):
    """d/dx, d/dA, d/dB (and d/dW for a float base) of sum(r * linear(x, W + s A B)).

    Without dropout the adapter is folded into the weight under a custom VJP, so every
    cotangent is written by hand; each is checked against its float64 formula.
    """
    x, w, a, b, r = rnd("g1", (3, 5, D)), rnd("g2", (D, F)), rnd("g3", (D, 4)), rnd("g4", (4, F)), rnd("g5", (3, 5, F))
    base = quant.quantize(w) if quantized else w
    wd = f64(lora._dense(base, jnp.float32))

    def loss(x, w, a, b):
        return jnp.sum(r * lora.linear(x, LoraWeight(w, a, b, scale=0.5)))

    argnums = (0, 2, 3) if quantized else (0, 1, 2, 3)
    got = jax.jit(jax.grad(loss, argnums=argnums))(x, base, a, b)
    x2, r2 = f64(x).reshape(-1, D), f64(r).reshape(-1, F)
    refs = {"x": (r2 @ (wd + 0.5 * f64(a) @ f64(b)).T).reshape(x.shape), "w": x2.T @ r2,
            "a": x2.T @ (0.5 * r2 @ f64(b).T), "b": 0.5 * (x2 @ f64(a)).T @ r2}
    names = ["x", "a", "b"] if quantized else ["x", "w", "a", "b"]
    for name, g in zip(names, got, strict=True):
        assert relerr(g, refs[name]) < 1e-5, name


def test_linear_several_output_axes():
    x, w = rnd("k1", (7, D)), rnd("k2", (D, 4, 8))
    a, b = rnd("k3", (D, 2)), rnd("k4", (2, 4, 8))
    y = jax.jit(lora.linear)(x, LoraWeight(w, a, b, scale=2.0))
    ref = np.einsum("bi,iho->bho", f64(x), f64(w)) + 2.0 * np.einsum(
        "bi,ir,rho->bho", f64(x), f64(a), f64(b)
    )
    assert y.shape == (7, 4, 8) and relerr(y, ref) < 1e-5


def test_register_linear_dispatches_foreign_leaves():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Doubled:
        w: jax.Array

    lora.register_linear(Doubled, lambda x, w, bias: 2.0 * lora.linear(x, w.w, bias))
    x, w = rnd(0, (3, D)), rnd(1, (D, 4))
    np.testing.assert_array_equal(jax.jit(lora.linear)(x, Doubled(w)), 2.0 * lora.linear(x, w))
    with pytest.raises(ValueError, match="cannot register"):
        lora.register_linear(LoraWeight, lambda x, w, b: x)


def test_embed_and_attend_match_float64():
    table = rnd("k1", (V, D))
    a, b = rnd("k2", (V, 3)), rnd("k3", (3, D))
    tw = LoraWeight(table, a, b, scale=0.25)
    ids = jnp.array([[0, 7, 49], [3, 3, 1]])
    full = f64(table) + 0.25 * f64(a) @ f64(b)
    assert relerr(jax.jit(lora.embed)(ids, tw), full[np.asarray(ids)]) < 1e-5
    x = rnd("k1", (2, 3, D))
    assert relerr(jax.jit(lora.attend)(x, tw), f64(x) @ full.T) < 1e-5
    np.testing.assert_array_equal(lora.embed(ids, table), table[ids])


def test_linear_on_qtensor_base_dequantizes_inside():
    w = rnd(3, (D, F))
    q = quant.quantize(w, "nf4")
    x = rnd(4, (5, D))
    wd = quant.dequantize(q, jnp.float32)
    np.testing.assert_allclose(jax.jit(lora.linear)(x, q), x @ wd, rtol=1e-6, atol=1e-5)
    a = rnd(5, (D, 4))
    b = rnd(6, (4, F))
    y = jax.jit(lora.linear)(x, LoraWeight(q, a, b, scale=0.5))
    ref = f64(x) @ f64(wd) + 0.5 * (f64(x) @ f64(a)) @ f64(b)
    assert relerr(y, ref) < 1e-5


@pytest.mark.parametrize("quantized", [False, True])
def test_stacked_leaves_under_scan(quantized):
    base = tiny_base()
    spec = LoraSpec(rank=4, targets=("q_proj",))
    ad = randomize(lora.init(jax.random.PRNGKey(0), base, spec))
    if quantized:
        base, _ = quant.quantize_tree(base)
        assert isinstance(base["layers"]["attn"]["q_proj"]["kernel"], quant.QTensor)
    x = rnd(9, (4, D))

    @jax.jit
    def run(base, ad):
        tree = lora.attach(base, ad)

        def body(h, layer):
            return lora.linear(h, layer["attn"]["q_proj"]["kernel"]), None

        return jax.lax.scan(body, x, tree["layers"])[0]

    w = base["layers"]["attn"]["q_proj"]["kernel"]
    w = f64(quant.dequantize(w, jnp.float32)) if quantized else f64(w)
    pair = ad["layers"]["attn"]["q_proj"]["kernel"]
    h = f64(x)
    for i in range(L):
        h = h @ w[i] + pair.scale * (h @ f64(pair.a[i])) @ f64(pair.b[i])
    assert relerr(run(base, ad), h) < 1e-5


def test_dropout_only_with_a_key_and_per_layer():
    base = tiny_base()
    spec = LoraSpec(rank=4, dropout=0.5, targets=QV)
    ad = randomize(lora.init(jax.random.PRNGKey(0), base, spec))
    ad = jax.tree.map(lambda x: x, ad)
    x = jnp.ones((8, D))
    no_key = lora.attach(base, ad)
    w = no_key["layers"]["attn"]["q_proj"]["kernel"]
    assert w.key is None
    plain = LoraWeight(w.w, w.a, w.b, scale=w.scale)  # dropout rate 0
    layer0 = lambda t: jax.tree.map(lambda v: v[0], t)
    np.testing.assert_array_equal(lora.linear(x, layer0(w)), lora.linear(x, layer0(plain)))

    keyed = lora.attach(base, ad, jax.random.PRNGKey(7))
    kw = keyed["layers"]["attn"]["q_proj"]["kernel"]
    assert kw.key.shape == (L, 2)
    assert not np.array_equal(kw.key[0], kw.key[1])
    assert not np.array_equal(kw.key[0], keyed["layers"]["attn"]["v_proj"]["kernel"].key[0])
    y = lora.linear(x, layer0(kw))
    assert not np.allclose(y, lora.linear(x, layer0(plain)))
    # inverted dropout: mean of the low-rank input is preserved, masked entries are exactly 0
    xd = lora._dropout(x, 0.5, kw.key[0])
    assert set(np.unique(np.asarray(xd))) <= {0.0, 2.0}
    assert 0.35 < float(jnp.mean(xd == 0)) < 0.65
    # rate 0: no key is attached even in training
    ad0 = lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=4, targets=QV))
    assert (
        lora.attach(base, ad0, jax.random.PRNGKey(7))["layers"]["attn"]["q_proj"]["kernel"].key
        is None
    )


def _dot_generals(jaxpr) -> list[tuple[tuple[int, ...], int]]:
    """(output shape, product of the contracted sizes) of every dot_general, nested included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            found.append((tuple(eqn.outvars[0].aval.shape),
                          int(np.prod([lhs_shape[i] for i in lhs_contract]))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_generals(sub)
    return found


def test_adapter_gradient_never_forms_a_full_weight_gradient():
    base = tiny_base()
    ad = randomize(lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=4, targets=("up_proj",))))
    x = rnd(1, (16, D))

    def loss(ad, base):
        tree = lora.attach(base, ad)

        def body(c, layer):
            return c + jnp.sum(lora.linear(x, layer["mlp"]["up_proj"]["kernel"]) ** 2), None

        return jax.lax.scan(body, 0.0, tree["layers"])[0]

    g = jax.jit(jax.grad(loss))(ad, base)
    dots = _dot_generals(jax.make_jaxpr(jax.grad(loss))(ad, base).jaxpr)
    assert dots, "no dot_general found: the check would be vacuous"

    def weight_gradient(shape, contracted):
        # [in, out] (or [out, in]) summed over the 16 tokens: N x in x out work. Folding the
        # adapter into the weight, W + s A B, contracts only the rank (4): r x in x out.
        return sorted(shape[-2:]) == sorted((D, F)) and contracted == x.shape[0]

    assert not any(weight_gradient(*d) for d in dots), dots
    # Control: the gradient w.r.t. the base does form the [in, out] product, so the check can fail.
    dots_w = _dot_generals(jax.make_jaxpr(jax.grad(loss, argnums=1))(ad, base).jaxpr)
    assert any(weight_gradient(*d) for d in dots_w), dots_w
    pair = g["layers"]["mlp"]["up_proj"]["kernel"]
    assert pair.a.shape == (L, D, 4) and pair.b.shape == (L, 4, F)
    assert float(jnp.abs(pair.a).sum()) > 0 and float(jnp.abs(pair.b).sum()) > 0


# ---------------------------------------------------------------- spec, targets, init


def test_scale_standard_vs_rslora_and_patterns():
    base = tiny_base()
    spec = LoraSpec(
        rank=8,
        alpha=16.0,
        targets=("q_proj", "v_proj", "up_proj"),
        rank_pattern={r"v_proj": 4, r"proj": 2},  # first match wins
        alpha_pattern=[(r"up_proj", 1.0)],
    )
    ad = lora.init(jax.random.PRNGKey(0), base, spec)
    q, v = ad["layers"]["attn"]["q_proj"]["kernel"], ad["layers"]["attn"]["v_proj"]["kernel"]
    up = ad["layers"]["mlp"]["up_proj"]["kernel"]
    assert (q.rank, v.rank, up.rank) == (2, 4, 2)
    assert (q.scale, v.scale, up.scale) == (8.0, 4.0, 0.5)
    rs_spec = LoraSpec(rank=8, alpha=16.0, scaling="rslora", targets=QV)
    rs = lora.init(jax.random.PRNGKey(0), base, rs_spec)
    assert rs["layers"]["attn"]["q_proj"]["kernel"].scale == 16.0 / math.sqrt(8)
    assert lora.lora_scale(16.0, 8) == 2.0
    assert hash(spec) == hash(LoraSpec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__}))


def test_target_forms():
    base = tiny_base()
    paths = lambda **kw: lora.resolve_targets(base, LoraSpec(**kw))
    all_linear = paths(targets="all-linear")
    assert all_linear == sorted(
        f"layers/{m}/kernel"
        for m in ["attn/q_proj", "attn/v_proj", "attn/o_proj", "mlp/up_proj", "mlp/down_proj"]
    )
    assert paths(targets=r"attn/(q|o)_proj") == [
        "layers/attn/o_proj/kernel",
        "layers/attn/q_proj/kernel",
    ]
    assert paths(targets="all-linear", exclude=["mlp"]) == [
        "layers/attn/o_proj/kernel",
        "layers/attn/q_proj/kernel",
        "layers/attn/v_proj/kernel",
    ]
    assert paths(targets=["embed", "lm_head"]) == ["embed/embedding", "lm_head/kernel"]


def test_init_distributions_and_embedding_roles():
    base = tiny_base()
    ad = lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=8, targets=["up_proj", "embed"]))
    up = ad["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.a.shape == (L, D, 8) and up.b.shape == (L, 8, F) and up.a.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(up.a))) <= 1 / math.sqrt(D) and float(
        jnp.std(up.a)
    ) > 0.4 / math.sqrt(D)
    assert not jnp.any(up.b)
    emb = ad["embed"]["embedding"]
    assert emb.a.shape == (V, 8) and emb.b.shape == (8, D)
    assert not jnp.any(emb.a) and 0.8 < float(jnp.std(emb.b)) < 1.2
    g = lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=8, init="gaussian", targets=QV))
    a = g["layers"]["attn"]["q_proj"]["kernel"].a
    assert abs(float(jnp.std(a)) - 1 / 8) < 0.01
    assert not jnp.array_equal(a[0], g["layers"]["attn"]["v_proj"]["kernel"].a[0])


@pytest.mark.parametrize("quantized", [False, True])
def test_pissa_residual_plus_adapter_is_the_base(quantized):
    base = tiny_base()
    spec = LoraSpec(rank=4, targets=("q_proj",), init="pissa")
    with pytest.raises(ValueError, match="init_pissa"):
        lora.init(jax.random.PRNGKey(0), base, spec)
    src = quant.quantize_tree(base)[0] if quantized else base
    resid, ad = lora.init_pissa(src, spec)
    w = src["layers"]["attn"]["q_proj"]["kernel"]
    w = f64(quant.dequantize(w, jnp.float32)) if quantized else f64(w)
    pair = ad["layers"]["attn"]["q_proj"]["kernel"]
    approx = pair.scale * np.einsum("lir,lro->lio", f64(pair.a), f64(pair.b))
    # the adapter is the best rank-4 approximation: its singular values are W's top 4
    np.testing.assert_allclose(
        np.linalg.svd(approx, compute_uv=False)[:, :4],
        np.linalg.svd(w, compute_uv=False)[:, :4],
        rtol=1e-4,
    )
    merged = lora.merge(resid, ad)["layers"]["attn"]["q_proj"]["kernel"]
    tol = 0.2 if quantized else 1e-5  # quantized: the residual is re-quantized
    assert relerr(merged, w) < tol
    if quantized:
        assert isinstance(resid["layers"]["attn"]["q_proj"]["kernel"], quant.QTensor)


# ---------------------------------------------------------------- merge / summary / errors


@pytest.mark.parametrize("quantized", [False, True])
def test_merged_forward_equals_adapter_forward(quantized):
    base = tiny_base()
    ad = randomize(lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=4, targets="all-linear")))
    if quantized:
        base, _ = quant.quantize_tree(base)
    merged = lora.merge(base, ad)
    mk = merged["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(mk, jax.Array) and mk.dtype == jnp.float32
    x = rnd(3, (6, D))
    f = jax.jit(lambda w: lora.linear(x, jax.tree.map(lambda v: v[1], w)))
    y_ad = f(lora.attach(base, ad)["layers"]["mlp"]["up_proj"]["kernel"])
    y_m = f(mk)
    assert relerr(y_m, f64(y_ad)) < 1e-5
    if not quantized:
        back = lora.unmerge(merged, ad)
        for p, v in lora.flatten_paths(base).items():
            np.testing.assert_allclose(lora.flatten_paths(back)[p], v, atol=1e-5)


def test_summary_counts():
    base = tiny_base()
    ad = lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=4, targets=("q_proj", "up_proj")))
    s = lora.summary(base, ad)
    trainable = L * (D * 4 + 4 * D) + L * (D * 4 + 4 * F)
    n_base = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(base))
    assert s.trainable == trainable and s.total == n_base + trainable and s.n_adapted == 2
    assert s.adapter_bytes == 4 * trainable
    assert abs(s.fraction - trainable / (n_base + trainable)) < 1e-12
    assert "trainable params" in str(s)
    qbase = quant.quantize_tree(base)[0]
    qs = lora.summary(qbase, ad)
    assert qs.total == s.total
    # init on a QTensor base gives the same adapter geometry as on the float base
    qad = lora.init(jax.random.PRNGKey(0), qbase, LoraSpec(rank=4, targets=("q_proj", "up_proj")))
    assert jax.tree.map(jnp.shape, qad) == jax.tree.map(jnp.shape, ad)


def test_bad_inputs():
    base = tiny_base()
    with pytest.raises(ValueError, match=r"'q_prj'.*q_proj"):
        lora.init(jax.random.PRNGKey(0), base, LoraSpec(targets=("q_prj",)))
    with pytest.raises(ValueError, match="match no adaptable"):
        lora.init(jax.random.PRNGKey(0), base, LoraSpec(targets=r"^nothing/"))
    with pytest.raises(ValueError, match="exceeds min"):
        lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=65, targets=QV))
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        LoraSpec(rank_pattern={"q": -1})
    with pytest.raises(ValueError, match="alpha"):
        LoraSpec(alpha=0.0)
    with pytest.raises(ValueError, match="scaling"):
        LoraSpec(scaling="fancy")
    with pytest.raises(ValueError, match="exclude"):
        lora.resolve_targets(base, LoraSpec(targets=("q_proj",), exclude=("attn",)))
    ad = lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=4, targets=QV))
    bad = jax.tree.map(lambda x: x, ad)
    pair = bad["layers"]["attn"]["q_proj"]["kernel"]
    bad["layers"]["attn"]["q_proj"]["kernel"] = LoraPair(pair.a, pair.b[:, :, :-1], scale=1.0)
    with pytest.raises(ValueError, match="layers/attn/q_proj/kernel.*does not fit"):
        lora.attach(base, bad)
    with pytest.raises(ValueError, match="does not fit"):
        lora.merge(base, bad)
    moved = {"layers": {"attn": {"k_proj": {"kernel": pair}}}}
    with pytest.raises(ValueError, match="not in the base"):
        lora.check_fit(base, moved)


# ---------------------------------------------------------------- a user's own NNX model


class UserModel(nnx.Module):
    """A small NNX model written here (not jaxlora.models): Embed, Linear, LinearGeneral, Einsum."""

    def __init__(self, rngs):
        self.tok = nnx.Embed(V, 16, rngs=rngs)
        self.heads = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
        self.merge_heads = nnx.Einsum("bthd,hdo->bto", (2, 8, 16), (16,), rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])

    def __call__(self, ids):
        h = self.tok(ids)  # [b, t, 16]
        h = self.merge_heads(self.heads(h))  # [b, t, 2, 8] -> [b, t, 16]
        for blk in self.blocks:
            h = jax.nn.gelu(blk(h))
        return self.tok.attend(h)  # [b, t, V]


def test_user_nnx_model_with_adapters_and_qtensor_base():
    model = UserModel(nnx.Rngs(0))
    base = lora.nnx_params(model)
    assert base["blocks"]["0"]["kernel"].shape == (16, 16)
    spec = LoraSpec(rank=2, targets=r"(kernel|embedding)$", stacked=())
    ad = lora.init(jax.random.PRNGKey(0), base, spec)
    assert len(lora.flatten_paths(ad)) == 5
    ids = jnp.arange(12).reshape(2, 6) % V
    run = jax.jit(lambda p, a: lora.nnx_bind(model, p, a)(ids))
    # B = 0: the base model's output (einsum vs lax.dot_general may round differently)
    y0 = model(ids)
    assert relerr(run(base, ad), f64(y0)) < 1e-6
    ad = randomize(ad, std=0.2)
    y = run(base, ad)
    y_merged = jax.jit(lambda p: lora.nnx_bind(model, p)(ids))(lora.merge(base, ad))
    assert relerr(y, f64(y_merged)) < 1e-5
    assert relerr(y, f64(y0)) > 1e-3
    # dropout (in the Einsum / LinearGeneral / Linear paths) only when a key is given
    drop = jax.tree.map(
        lambda p: dataclasses.replace(p, dropout=0.5), ad, is_leaf=lambda x: isinstance(x, LoraPair)
    )
    run_key = jax.jit(lambda p, a, k: lora.nnx_bind(model, p, a, k)(ids))
    np.testing.assert_array_equal(run(base, drop), y)
    assert relerr(run_key(base, drop, jax.random.PRNGKey(1)), f64(y)) > 1e-3
    # gradients reach the adapters through the user's model
    g = jax.jit(jax.grad(lambda a: jnp.sum(lora.nnx_bind(model, base, a)(ids) ** 2)))(ad)
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g))
    # quantized base: same as running on the dequantized weights
    qbase, _ = quant.quantize_tree(
        base, quant.QuantRules(include=r"(kernel|embedding)$", exclude=r"bias$", stacked=r"^$")
    )
    n_q = sum(isinstance(v, quant.QTensor) for v in lora.flatten_paths(qbase).values())
    assert n_q == 5
    deq = jax.tree.map(
        lambda v: quant.dequantize(v, jnp.float32) if isinstance(v, quant.QTensor) else v,
        qbase,
        is_leaf=lambda v: isinstance(v, quant.QTensor),
    )
    np.testing.assert_allclose(run(qbase, ad), run(deq, ad), rtol=1e-5, atol=1e-4)
    # the user's model object is untouched
    np.testing.assert_array_equal(
        lora.nnx_params(model)["blocks"]["0"]["kernel"], base["blocks"]["0"]["kernel"]
    )


def test_qtensor_backward_keeps_codes_not_a_dense_weight():
    """QLoRA's memory promise: the input gradient re-dequantizes instead of saving float W."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(256, 512)), jnp.float32)
    q = quant.quantize(w)
    x = jnp.ones((8, 256), jnp.float32)
    _, vjp = jax.vjp(lambda x: jnp.sum(jnp.tanh(lora.linear(x, q))), x)
    residual_shapes = [leaf.shape for leaf in jax.tree.leaves(vjp)]
    assert (256, 512) not in residual_shapes
    assert q.codes.shape in residual_shapes  # the packed codes are what is kept
    _, vjp_dense = jax.vjp(lambda x: jnp.sum(jnp.tanh(x @ quant.dequantize(q))), x)
    assert (256, 512) in [leaf.shape for leaf in jax.tree.leaves(vjp_dense)]  # the control
