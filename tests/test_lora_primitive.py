"""Tests for jaxlora.lora.primitive: linear / einsum / embed / attend, their VJPs, attach."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from lora_helpers import QV, D, F, L, V, f64, randomize, relerr, rnd, tiny_base

from jaxlora import lora, quant
from jaxlora.lora import LoraSpec, LoraWeight, primitive


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
    x, w, a, b, r = (
        rnd("g1", (3, 5, D)),
        rnd("g2", (D, F)),
        rnd("g3", (D, 4)),
        rnd("g4", (4, F)),
        rnd("g5", (3, 5, F)),
    )
    base = quant.quantize(w) if quantized else w
    wd = f64(quant.dequantize(base, jnp.float32) if quantized else base)

    def loss(x, w, a, b):
        return jnp.sum(r * lora.linear(x, LoraWeight(w, a, b, scale=0.5)))

    argnums = (0, 2, 3) if quantized else (0, 1, 2, 3)
    got = jax.jit(jax.grad(loss, argnums=argnums))(x, base, a, b)
    x2, r2 = f64(x).reshape(-1, D), f64(r).reshape(-1, F)
    refs = {
        "x": (r2 @ (wd + 0.5 * f64(a) @ f64(b)).T).reshape(x.shape),
        "w": x2.T @ r2,
        "a": x2.T @ (0.5 * r2 @ f64(b).T),
        "b": 0.5 * (x2 @ f64(a)).T @ r2,
    }
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
    ad = randomize(lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=4, dropout=0.5, targets=QV)))
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
    eye = jnp.eye(D)
    probe = LoraWeight(jnp.zeros((D, D)), eye, eye, key=kw.key[0], scale=1.0, dropout=0.5)
    xd = lora.linear(x, probe)  # x @ 0 + (dropout(x) @ I) @ I: the dropped input itself
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
            found.append(
                (
                    tuple(eqn.outvars[0].aval.shape),
                    int(np.prod([lhs_shape[i] for i in lhs_contract])),
                )
            )
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


# ---------------------------------------------------------------- einsum (the NNX layers' path)

EINSUMS = [
    ("bthd,hdo->bto", (2, 3, 4, 16), (4, 16, 32)),  # two kernel axes contracted (merge heads)
    ("btd,dhk->bthk", (2, 3, 32), (32, 4, 16)),  # linear-shaped, several output axes
    ("bhtd,hdk->bhtk", (2, 4, 3, 16), (4, 16, 8)),  # LoRA's `in` (h) is a batch axis
    ("...d,dk->...k", (2, 3, 32), (32, 24)),  # an ellipsis in x
]


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("eq,x_shape,w_shape", EINSUMS)
def test_einsum_values_and_gradients_equal_the_float_computation(eq, x_shape, w_shape, quantized):
    """`primitive.einsum` on a LoraWeight (float or QTensor base) is ``jnp.einsum(eq, x, W + s A B)``.

    The reference is plain autodiff of ``jnp.einsum`` on the dense (dequantized) kernel, so the
    transposes written in the custom VJP are checked for each equation form.
    """
    x, w = rnd(("x", eq), x_shape), rnd(("w", eq), w_shape)
    a, b = rnd(("a", eq), (w_shape[0], 2)), rnd(("b", eq), (2, *w_shape[1:]))
    base = quant.quantize(w) if quantized else w
    wd = quant.dequantize(base, jnp.float32) if quantized else w

    def plain(x, w, a, b):
        return jnp.einsum(eq, x, w + 0.5 * jnp.tensordot(a, b, 1))

    def ours(x, w, a, b):
        return primitive.einsum(eq, x, LoraWeight(w, a, b, scale=0.5))

    ct = rnd(("ct", eq), plain(x, wd, a, b).shape)
    loss = lambda f: lambda *args: jnp.sum(ct * f(*args))  # noqa: E731
    assert relerr(jax.jit(ours)(x, base, a, b), f64(plain(x, wd, a, b))) < 1e-5
    argnums = (0, 2, 3) if quantized else (0, 1, 2, 3)  # d/dW only for a float base
    got = jax.jit(jax.grad(loss(ours), argnums))(x, base, a, b)
    ref = jax.grad(loss(plain), argnums)(x, wd, a, b)
    for name, g, r in zip("xwab" if not quantized else "xab", got, ref, strict=True):
        assert g.shape == r.shape and relerr(g, f64(r)) < 1e-5, name
    # a bare base (no adapter) is the plain einsum, value and input gradient
    y0, g0 = jax.value_and_grad(loss(lambda x: primitive.einsum(eq, x, base)))(x)
    r0, h0 = jax.value_and_grad(loss(lambda x: jnp.einsum(eq, x, wd)))(x)
    assert relerr(y0, f64(r0)) < 1e-5 and relerr(g0, f64(h0)) < 1e-5


def test_einsum_refuses_an_ellipsis_in_the_kernel_with_lora():
    x, w = rnd(0, (3, 8)), rnd(1, (8, 4))
    np.testing.assert_allclose(primitive.einsum("bi,i...->b...", x, w), x @ w, rtol=1e-6)
    with pytest.raises(ValueError, match="must not use"):
        primitive.einsum("bi,i...->b...", x, LoraWeight(w, rnd(2, (8, 2)), rnd(3, (2, 4))))
