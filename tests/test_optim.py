"""Tests for jaxlora.optim: adapters-only optimization, state size, schedules, errors."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora import lora, optim, quant
from jaxlora.lora import LoraSpec
from jaxlora.optim import OptimSpec

L, D, F = 2, 32, 64


def rnd(seed, shape):
    """Standard-normal float32 test data from numpy (no per-shape JAX RNG compiles)."""
    rng = np.random.default_rng(zlib.crc32(str(seed).encode()))
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def tiny():
    base = {
        "layers": {
            "q_proj": {"kernel": rnd("ks[0]", (L, D, D)) / math.sqrt(D)},
            "up_proj": {"kernel": rnd("ks[1]", (L, D, F)) / math.sqrt(D)},
            "norm": {"scale": jnp.ones((L, D))},
        },
        "lm_head": {"kernel": rnd("ks[2]", (F, 8))},
    }
    ad = lora.init(jax.random.PRNGKey(3), base, LoraSpec(rank=4, targets=("q_proj", "up_proj")))
    return base, ad


def forward(tree, x):
    def body(h, layer):
        h = lora.linear(h, layer["q_proj"]["kernel"]) * layer["norm"]["scale"]
        return h, lora.linear(h, layer["up_proj"]["kernel"])

    h, ups = jax.lax.scan(body, x, tree["layers"])
    return lora.linear(jnp.tanh(ups[-1]), tree["lm_head"]["kernel"])


def loss_fn(params, x):
    """Loss on a combined {"base", "adapters"} tree (gradients flow to both)."""
    return jnp.mean(forward(lora.attach(params["base"], params["adapters"]), x) ** 2)


def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if x.ndim > 0)


@pytest.mark.parametrize("quantized", [False, True])
def test_base_bit_identical_only_adapters_change_and_state_size(quantized):
    base, ad = tiny()
    if quantized:
        base, _ = quant.quantize_tree(base)
    params = {"base": base, "adapters": ad}
    spec = OptimSpec(lr=1e-2, weight_decay=0.1, schedule="constant")
    tx = optim.adapters_only(optim.make_optimizer(spec), params)
    state = tx.init(params)
    # Adam keeps mu and nu for the adapters only: exactly 2 x the adapter bytes.
    assert nbytes(state) == 2 * nbytes(ad)
    x = rnd(1, (4, D))

    if quantized:
        # QLoRA: integer QTensor codes have no gradient; differentiate the adapters only and
        # hand the optimizer zero (float) gradients for the frozen float leaves.
        def grads(params):
            g_ad = jax.grad(lambda a: loss_fn({"base": params["base"], "adapters": a}, x))(
                params["adapters"]
            )
            return {"base": jax.tree.map(jnp.zeros_like, params["base"]), "adapters": g_ad}
    else:

        def grads(params):
            return jax.grad(loss_fn)(params, x)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads(params), state, params)
        return optax.apply_updates(params, updates), state

    new = params
    for _ in range(3):
        new, state = step(new, state)
    for before, after in zip(
        jax.tree.leaves(params["base"]), jax.tree.leaves(new["base"]), strict=True
    ):
        assert before.dtype == after.dtype
        np.testing.assert_array_equal(before, after)
    changed = [
        not np.array_equal(b, a)
        for b, a in zip(jax.tree.leaves(ad), jax.tree.leaves(new["adapters"]), strict=True)
    ]
    assert all(changed)
    assert float(loss_fn(new, x)) < float(loss_fn(params, x))


def test_attached_tree_labels_and_frozen_w():
    base, ad = tiny()
    tree = lora.attach(base, ad, jax.random.PRNGKey(0))
    labels = optim.adapter_labels(tree)
    w = labels["layers"]["q_proj"]["kernel"]
    assert (w.w, w.a, w.b) == ("frozen", "adapters", "adapters")
    assert labels["lm_head"]["kernel"] == "frozen"
    tx = optim.adapters_only(optax.adam(1e-2), tree)
    state = tx.init(tree)
    assert nbytes(state) == 2 * nbytes(ad)
    g = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(g, state, tree)
    u = updates["layers"]["q_proj"]["kernel"]
    assert not jnp.any(u.w) and jnp.all(u.a != 0) and not jnp.any(updates["lm_head"]["kernel"])


def test_clipping_and_weight_decay_see_adapters_only():
    base, ad = tiny()
    params = {"base": base, "adapters": ad}
    # huge base gradients must not shrink the clipped adapter update
    g = {
        "base": jax.tree.map(lambda v: 1e6 * jnp.ones_like(v), base),
        "adapters": jax.tree.map(lambda v: jnp.full_like(v, 1e-4), ad),
    }
    gnorm = float(optax.tree.norm(g["adapters"]))
    assert gnorm < 1.0
    tx = optim.adapters_only(optim.make_optimizer(
        OptimSpec(name="sgd", lr=1.0, max_grad_norm=1.0, b1=0.0, schedule="constant")), params)
    u, _ = tx.update(g, tx.init(params), params)
    for ua, ga in zip(jax.tree.leaves(u["adapters"]), jax.tree.leaves(g["adapters"]), strict=True):
        np.testing.assert_allclose(ua, -ga, rtol=1e-6)
    # decoupled weight decay, zero gradients: adapters shrink by lr * wd * p, base untouched
    tx = optim.adapters_only(
        optim.make_optimizer(
            OptimSpec(lr=0.1, weight_decay=0.5, max_grad_norm=0.0, schedule="constant")
        ),
        params,
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    for ua, pa in zip(jax.tree.leaves(u["adapters"]), jax.tree.leaves(ad), strict=True):
        np.testing.assert_allclose(ua, -0.05 * pa, rtol=1e-6, atol=1e-12)
    assert not any(jnp.any(x) for x in jax.tree.leaves(u["base"]))


def test_explicit_labels_and_callable():
    base, ad = tiny()
    params = {"base": base, "adapters": ad}
    labels = optim.adapter_labels(params)
    for t in (labels, optim.adapter_labels):
        tx = optim.adapters_only(optax.adam(1e-3), t)
        assert nbytes(tx.init(params)) == 2 * nbytes(ad)
    with pytest.raises(ValueError, match="labels must be"):
        optim.adapters_only(optax.adam(1e-3), jax.tree.map(lambda _: "oops", labels))
    with pytest.raises(ValueError, match="no adapter"):
        optim.adapters_only(optax.adam(1e-3), base)


def test_schedules():
    s = optim.make_schedule(1.0, "constant", warmup_steps=10)
    assert [float(s(i)) for i in (0, 5, 10, 100)] == [0.0, 0.5, 1.0, 1.0]
    s = optim.make_schedule(1.0, "linear", warmup_steps=10, total_steps=110)
    np.testing.assert_allclose([float(s(i)) for i in (5, 10, 60, 110)], [0.5, 1.0, 0.5, 0.0])
    s = optim.make_schedule(2.0, "cosine", warmup_steps=0, total_steps=100)
    np.testing.assert_allclose([float(s(i)) for i in (0, 50, 100)], [2.0, 1.0, 0.0], atol=1e-6)
    assert float(optim.make_schedule(3.0)(1000)) == 3.0


def test_optimizer_by_name_and_errors():
    p = {"w": jnp.ones(3)}
    txs = [optim.optax_optimizer(n, 1e-3) for n in ("adamw", "adam", "sgd", "lion", "adafactor")]
    txs += [
        optim.make_optimizer(OptimSpec(name=n, lr=1e-3, schedule="constant"))
        for n in ("adamw", "adam", "sgd")
    ]
    for tx in txs:
        u, _ = tx.update({"w": jnp.ones(3)}, tx.init(p), p)
        assert jnp.all(u["w"] < 0)
    with pytest.raises(ValueError, match="adamw"):
        optim.optax_optimizer("adamww", 1e-3)
    with pytest.raises(ValueError, match="adamw"):
        OptimSpec(name="adamww")
    with pytest.raises(ValueError, match="weight_decay"):
        optim.make_optimizer(OptimSpec(name="sgd", weight_decay=0.1, schedule="constant"))
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_optimizer(OptimSpec(schedule="cosine"))
    with pytest.raises(ValueError, match="schedule"):
        OptimSpec(schedule="step")
    with pytest.raises(ValueError, match="max_grad_norm"):
        OptimSpec(max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="OptimSpec.lr"):
        OptimSpec(lr=0.0)


def test_spec_hyperparameters_reach_optax():
    """make_optimizer(spec) == clip -> optax.<name>(schedule, b1, b2, eps / momentum)."""
    p = {"w": jnp.asarray([1.0, -2.0, 3.0])}
    g = {"w": jnp.asarray([30.0, 0.5, -4.0])}  # global norm > 1: clipping matters

    def first_update(tx):
        return np.asarray(tx.update(g, tx.init(p), p)[0]["w"])

    spec = OptimSpec(lr=0.1, schedule="linear", b1=0.5, b2=0.9, eps=1e-1,
                     weight_decay=0.01, max_grad_norm=1.0)
    sched = optim.make_schedule(0.1, "linear", total_steps=10)
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.5, b2=0.9, eps=1e-1, weight_decay=0.01))
    ours = first_update(optim.make_optimizer(spec, 10))
    np.testing.assert_allclose(ours, first_update(ref), rtol=1e-6)
    unclipped = optax.adamw(sched, b1=0.5, b2=0.9, eps=1e-1, weight_decay=0.01)
    assert np.abs(ours - first_update(unclipped)).max() > 1e-3  # control: clipping shows
    sgd = OptimSpec(name="sgd", lr=0.1, schedule="constant", b1=0.5, max_grad_norm=0.0)
    np.testing.assert_allclose(  # max_grad_norm = 0: no clipping (the TOML spelling of "off")
        first_update(optim.make_optimizer(sgd)), first_update(optax.sgd(0.1, momentum=0.5))
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_decays_to_min_lr_ratio(schedule):
    sched = optim.make_schedule(1.0, schedule, warmup_steps=2, total_steps=10, min_lr_ratio=0.25)
    assert float(sched(0)) == 0.0
    assert float(sched(2)) == pytest.approx(1.0)
    assert float(sched(10)) == pytest.approx(0.25)
    assert all(float(sched(s)) >= 0.25 - 1e-7 for s in range(2, 11))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_plus_updates_b_at_the_ratio_of_plain_adam(method):
    """LoRA+ (arXiv 2402.12354): B's (and DoRA's magnitude's) update is `ratio` x plain
    Adam's over several steps of a warmup-cosine schedule and global clipping; A's is plain."""
    base, _ = tiny()
    ad = lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=4, targets=("q_proj",), method=method))
    grads = [jax.tree.map(lambda t, i=i: rnd(f"g{i}{t.shape}", t.shape), ad) for i in range(3)]
    kw = dict(lr=1e-2, schedule="cosine", warmup_steps=1, max_grad_norm=1.0, weight_decay=0.1)

    def updates(ratio):
        tx = optim.make_optimizer(OptimSpec(lora_plus_ratio=ratio, **kw), total_steps=5)
        state, out = tx.init(ad), []
        for g in grads:
            u, state = tx.update(g, state, ad)
            out.append(u["layers"]["q_proj"]["kernel"])
        return out[1:]  # step 0: the warmup's zero learning rate

    for plain, plus in zip(updates(1.0), updates(16.0), strict=True):
        np.testing.assert_allclose(plus.a, plain.a, rtol=1e-6)
        np.testing.assert_allclose(plus.b, 16.0 * plain.b, rtol=1e-5)
        assert float(jnp.abs(plain.b).max()) > 0
        if method == "dora":
            np.testing.assert_allclose(plus.m, 16.0 * plain.m, rtol=1e-5)


def test_lora_plus_ratio_must_be_positive():
    from jaxlora import config
    from jaxlora.errors import ConfigError

    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="lora_plus_ratio"):
            optim.make_optimizer(OptimSpec(lora_plus_ratio=bad, schedule="constant"))
        with pytest.raises(ConfigError, match=r"optim\.lora_plus_ratio"):
            config.config_from_dict({"optim": {"lora_plus_ratio": bad}})
