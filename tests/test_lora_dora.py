"""DoRA (Liu et al. 2024, arXiv 2402.09353) against float64 formulas: forward, every gradient,
the dropout form PEFT uses, init, merge / unmerge, float and NF4 bases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lora_helpers import D, F, L, f64, randomize, relerr, rnd, tiny_base

from jaxlora import lora, models, quant
from jaxlora.lora import LoraSpec
from jaxlora.lora.primitive import LoraWeight, _dropout

S = 0.7  # the LoRA scale s


def _layer(quantized, seed=0):
    """A random ``[D, F]`` base (NF4 or float), adapters with non-zero B, and a magnitude
    away from the base norm, so every term of the formulas matters."""
    w = rnd(seed, (D, F)) / np.sqrt(D)
    if quantized:
        w = quant.quantize(w, "nf4")
    a, b = 0.3 * rnd(seed + 1, (D, 4)), 0.3 * rnd(seed + 2, (4, F))
    m = 1.0 + 0.2 * rnd(seed + 3, (F,))
    return w, a, b, m


def _reference(w, a, b, m, x, ct, d=None):
    """Float64 DoRA: ``y = (m / ||W'||_c) (x W')``, ``W' = W + s A B``, the norm a constant
    (the paper's section 4.3), and its gradients written out by hand. With ``d`` (the
    dropped-out input): PEFT's ``y = x W + (g - 1) (d W) + g s (d A) B``."""
    w = f64(quant.dequantize(w) if isinstance(w, quant.QTensor) else w)
    shape = x.shape
    a, b, m = map(f64, (a, b, m))
    x, ct = f64(x).reshape(-1, D), f64(ct).reshape(-1, F)  # [tokens, in], [tokens, out]
    wp = w + S * a @ b  # [in, out]
    g = m / np.linalg.norm(wp, axis=0)  # [out]
    if d is None:
        y = (x @ wp) * g
        gy = ct * g  # the cotangent of x W'
        dw = x.T @ gy  # d L / d W' with the norm held constant
        return y.reshape(*shape[:-1], F), dict(x=(gy @ wp.T).reshape(shape), a=S * dw @ b.T, b=S * a.T @ dw,
                       m=np.sum(ct * (x @ wp), axis=0) / np.linalg.norm(wp, axis=0))
    d = f64(d).reshape(-1, D)
    keep = (d != 0) / (1.0 - 0.25)  # d = keep * x
    y = x @ w + (g - 1) * (d @ w) + g * (S * (d @ a) @ b)
    gy = ct * g
    dd = (ct * (g - 1)) @ w.T + S * (gy @ b.T) @ a.T  # d L / d d
    return y.reshape(*shape[:-1], F), dict(x=(ct @ w.T + keep * dd).reshape(shape), a=S * d.T @ gy @ b.T, b=S * (d @ a).T @ gy,
                   m=np.sum(ct * (d @ wp), axis=0) / np.linalg.norm(wp, axis=0))


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_forward_and_every_gradient_equal_the_float64_formulas(quantized, dropout):
    w, a, b, m = _layer(quantized)
    x, ct = rnd(5, (3, 7, D)), rnd(6, (3, 7, F))
    key = jax.random.key(3) if dropout else None

    def f(x, a, b, m):
        lw = LoraWeight(w=w, a=a, b=b, key=key, scale=S, dropout=0.25 if dropout else 0.0, m=m)
        return lora.linear(x, lw)

    y, vjp = jax.vjp(jax.jit(f), x, a, b, m)
    grads = dict(zip("xabm", jax.jit(vjp)(ct), strict=True))
    d = _dropout(x, 0.25, key) if dropout else None
    y_ref, g_ref = _reference(w, a, b, m, x, ct, d)
    assert relerr(y, y_ref) < 2e-6
    for name, ref in g_ref.items():
        assert relerr(grads[name], ref) < 2e-6, name


def test_the_norm_is_detached():
    """Control for the formulas above: with the norm differentiated (the paper's eq. 5 without
    the section 4.3 simplification) the B gradient differs, so the test can tell."""
    w, a, b, m = _layer(False)
    x, ct = rnd(5, (11, D)), rnd(6, (11, F))
    ours = jax.grad(lambda b: jnp.sum(ct * lora.linear(x, LoraWeight(w, a, b, scale=S, m=m))))(b)

    def attached(b):
        wp = w + S * a @ b
        return jnp.sum(ct * (x @ wp) * m / jnp.linalg.norm(wp, axis=0))

    _, g_ref = _reference(w, a, b, m, x, ct)
    assert relerr(ours, g_ref["b"]) < 2e-6
    assert relerr(jax.grad(attached)(b), g_ref["b"]) > 1e-3


@pytest.mark.parametrize("qtype", ["none", "nf4"])
def test_initialized_dora_is_the_base_model_exactly(qtype):
    from jaxlora import io

    m = io.load_model("tiny-llama", quant=None if qtype == "none" else quant.QuantRules(qtype=qtype))
    ad = lora.init(jax.random.key(0), m.params, LoraSpec(rank=4, method="dora"))
    pair = lora.flatten_paths(ad)["layers/mlp/down_proj/kernel"]
    assert pair.m.shape == (m.config.num_layers, m.config.hidden_size)
    tokens = (jnp.arange(24)[None] * 7) % m.config.vocab_size
    fwd = jax.jit(lambda ad: models.forward(m.config, m.params, tokens, adapters=ad))
    base = jax.jit(lambda: models.forward(m.config, m.params, tokens))()
    np.testing.assert_array_equal(np.asarray(fwd(ad)), np.asarray(base))
    moved = jax.tree.map(lambda t: t * 1.01, ad)  # control: a different magnitude shows
    assert float(jnp.abs(fwd(moved) - base).max()) > 1e-4


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_merge_and_unmerge_are_exact(quantized):
    base = tiny_base()
    if quantized:
        base, _ = quant.quantize_tree(base, quant.QuantRules(qtype="nf4"))
    spec = LoraSpec(rank=4, targets=("q_proj", "up_proj"), method="dora")
    ad = lora.init(jax.random.key(0), base, spec)
    ad = jax.tree.map(lambda t: t + 0.05 * rnd(9, t.shape), randomize(ad))
    x = rnd(4, (5, D))

    def outputs(tree):
        ys = []
        for layer in range(L):
            leaf = lambda t, i=layer: jax.tree.map(lambda v: v[i], t)  # noqa: E731
            ys.append(lora.linear(x, leaf(tree["layers"]["mlp"]["up_proj"]["kernel"])))
        return f64(jnp.stack(ys))

    merged = lora.merge(base, ad)
    attached = lora.attach(base, ad)
    assert relerr(outputs(merged), outputs(attached)) < 2e-6
    norms = lora.dora_norms(base, ad)
    with pytest.raises(ValueError, match="needs its column norms"):
        lora.unmerge(merged, ad)
    back = lora.flatten_paths(lora.unmerge(merged, ad, norms))
    for path in ("layers/attn/q_proj/kernel", "layers/mlp/up_proj/kernel"):
        w0 = lora.flatten_paths(base)[path]
        w0 = quant.dequantize(w0) if isinstance(w0, quant.QTensor) else w0
        assert relerr(back[path], f64(w0)) < 2e-6


def test_einsum_dora_equals_linear_and_refuses_axes_it_cannot_scale():
    w, a, b, m = _layer(False)
    lw = LoraWeight(w=w, a=a, b=b, scale=S, m=m)
    x = rnd(7, (2, 3, D))
    np.testing.assert_allclose(lora.primitive.einsum("btd,df->btf", x, lw), lora.linear(x, lw),
                               rtol=1e-6, atol=1e-6)
    w3 = w.reshape(D, 8, F // 8)
    lw3 = LoraWeight(w=w3, a=a, b=b.reshape(4, 8, F // 8), scale=S, m=m.reshape(8, F // 8))
    with pytest.raises(ValueError, match="must be the last axes"):
        lora.primitive.einsum("btd,dhk->bkh", x, lw3)


def test_dora_refuses_embeddings_and_bad_magnitudes():
    base = tiny_base()
    with pytest.raises(ValueError, match="embedding table; DoRA adapts linear kernels only"):
        lora.init(jax.random.key(0), base, LoraSpec(rank=2, targets=("embed", "q_proj"),
                                                    method="dora"))
    ad = lora.init(jax.random.key(0), base, LoraSpec(rank=2, targets=("q_proj",), method="dora"))
    pair = ad["layers"]["attn"]["q_proj"]["kernel"]
    bad = {"layers": {"attn": {"q_proj": {"kernel": lora.LoraPair(
        pair.a, pair.b, pair.scale, m=pair.m[:, :-1])}}}}
    with pytest.raises(ValueError, match=r"magnitude \(2, 63\), expected"):
        lora.attach(base, bad)


def test_dora_magnitude_is_trained_and_labelled():
    from jaxlora import optim

    base = tiny_base()
    ad = lora.init(jax.random.key(0), base, LoraSpec(rank=2, targets=("q_proj",), method="dora"))
    labels = lora.flatten_paths(optim.adapter_labels({"adapters": ad, "base": base})["adapters"])
    assert labels["layers/attn/q_proj/kernel"].m == optim.TRAINABLE
    x = rnd(3, (6, D))

    def loss(ad):
        kernel = lora.attach(base, ad)["layers"]["attn"]["q_proj"]["kernel"]
        return jnp.sum(jnp.sin(lora.linear(x, jax.tree.map(lambda t: t[0], kernel))))

    g = jax.grad(loss)(ad)["layers"]["attn"]["q_proj"]["kernel"]
    assert float(jnp.abs(g.m[0]).sum()) > 0 and float(jnp.abs(g.m[1]).sum()) == 0


@pytest.mark.slow
def test_a_dora_run_trains_checkpoints_and_exports(tmp_path):
    """`jaxlora train` of a DoRA config end to end: the magnitudes train, come back from the
    checkpoint, and export as PEFT (use_dora) and merged."""
    import json

    from conftest import write_tiny_config

    from jaxlora import export, train
    from jaxlora.config import load_config

    cfg = load_config(write_tiny_config(tmp_path, steps=2), {"lora.method": "dora"})
    s = train.run(cfg)
    assert s["val_loss"] < s["val_loss_before"]
    opened = train.open_run(cfg.run_dir)
    start = lora.init(jax.random.key(cfg.train.seed), opened.base, cfg.lora)
    m0 = lora.flatten_paths(start)["layers/mlp/up_proj/kernel"].m
    m = lora.flatten_paths(opened.adapters)["layers/mlp/up_proj/kernel"].m
    assert float(jnp.abs(m - m0).max()) > 0  # the magnitude was trained and restored
    export.export(cfg.run_dir, "peft", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"]
    export.export(cfg.run_dir, "merged", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
