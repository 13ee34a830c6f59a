"""Tests for jaxlora.lora.adapters: init, PiSSA, merge / unmerge, summary."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lora_helpers import QV, D, F, L, V, f64, randomize, relerr, rnd, tiny_base

from jaxlora import lora, quant
from jaxlora.lora import LoraSpec


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
