"""Tests for jaxlora.lora.nnx: a user's own Flax NNX model with adapters and QTensor bases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lora_helpers import V, f64, randomize, relerr

from jaxlora import lora, quant
from jaxlora.lora import LoraPair, LoraSpec


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


@pytest.mark.parametrize("adapter", ["none", "lora", "lora+dropout"])
def test_qtensor_einsum_backward_keeps_codes_not_a_dense_weight(adapter):
    """nnx.Einsum on a QTensor kernel keeps QLoRA's memory promise, as `linear` does.

    The vjp's residuals hold the packed codes and no float array of the kernel's size: the
    folded path rebuilds ``W + s A B`` from the codes, the bare and dropout paths re-dequantize.
    Values and gradients equal the same layer run on the dequantized float kernel.
    """
    eq = "btd,dhk->bthk"
    layer = nnx.Einsum(eq, (256, 4, 128), rngs=nnx.Rngs(0))  # W [256, 4, 128]
    w = lora.nnx_params(layer)["kernel"]
    q = quant.quantize(w)
    ad, key = None, None
    if adapter != "none":
        ad = randomize(
            lora.init(
                jax.random.PRNGKey(0),
                {"kernel": w},
                LoraSpec(
                    rank=4,
                    targets=r"kernel$",
                    stacked=(),
                    dropout=0.5 if "dropout" in adapter else 0.0,
                ),
            ),
            std=0.2,
        )
        key = jax.random.PRNGKey(1) if "dropout" in adapter else None
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 256)), jnp.float32)

    def loss(params, ad, x):
        return jnp.sum(jnp.tanh(lora.nnx_bind(layer, params, ad, key)(x)))

    def float_residuals(f):
        _, vjp = jax.vjp(f, x)
        return vjp, [r for r in jax.tree.leaves(vjp) if jnp.issubdtype(r.dtype, jnp.floating)]

    vjp, res = float_residuals(lambda x: loss({"kernel": q}, ad, x))
    assert res and all(r.size != w.size for r in res), [r.shape for r in res]
    assert q.codes.shape in [r.shape for r in jax.tree.leaves(vjp)]  # the packed codes are kept
    # Controls: the old dense einsum, and the same layer on the dequantized float kernel, both
    # keep a float array of the kernel's size, so the check above can fail.
    wd = quant.dequantize(q, jnp.float32)
    for f in (
        lambda x: jnp.sum(jnp.tanh(jnp.einsum(eq, x, wd))),
        lambda x: loss({"kernel": wd}, ad, x),
    ):
        assert any(r.size == w.size for r in float_residuals(f)[1])
    # the same values and gradients (input, adapters) as the float kernel
    argnums = (2,) if ad is None else (1, 2)
    val, got = jax.jit(jax.value_and_grad(loss, argnums))({"kernel": q}, ad, x)
    ref_val, ref = jax.jit(jax.value_and_grad(loss, argnums))({"kernel": wd}, ad, x)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert relerr(g, f64(r)) < 1e-5
