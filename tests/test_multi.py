"""jaxlora.multi: per-row adapters in one batch equal separate runs with each adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_adapters

from jaxlora import lora, multi, quant
from jaxlora.models import ModelConfig, forward, init_params

CFG = ModelConfig.tiny_llama()


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    base = jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape, np.float32)), shapes
    )
    # jitted: one compile instead of one per eager op
    qbase = jax.jit(lambda b: quant.quantize_tree(b, quant.QuantRules(qtype="nf4"))[0])(base)
    ads = [
        random_adapters(base, lora.LoraSpec(rank=4, alpha=8, targets="all-linear"), 1, std=0.1),
        random_adapters(base, lora.LoraSpec(rank=2, alpha=16, targets=("q_proj", "v_proj")), 2,
                        std=0.1),
        random_adapters(
            base,
            lora.LoraSpec(
                rank=8, alpha=4, scaling="rslora", targets=("o_proj", "up_proj", "down_proj")
            ),
            3,
            std=0.1,
        ),
    ]
    return qbase, ads


def test_single_linear_matches_per_row() -> None:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 12), np.float32))
    pairs = [
        lora.LoraPair(
            jnp.asarray(rng.standard_normal((16, r), np.float32)),
            jnp.asarray(rng.standard_normal((r, 12), np.float32)),
            s,
        )
        for r, s in ((2, 0.5), (4, 3.0))
    ]
    stacked = multi.stack_adapters([{"k": p} for p in pairs])["k"]
    ids = jnp.asarray([1, 0, -1, 1], jnp.int32)
    x = jnp.asarray(rng.standard_normal((4, 3, 16), np.float32))
    mw = multi.MultiLoraWeight(w, stacked.a, stacked.b, ids, stacked.scales)
    y = jax.jit(multi.multi_linear)(x, mw)
    for i, k in enumerate(np.asarray(ids)):
        ref = x[i] @ w
        if k >= 0:
            ref = ref + pairs[k].scale * (x[i] @ pairs[k].a) @ pairs[k].b
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # one base matmul for the whole batch: 3 dot_generals (base, A, B), whatever B and N are
    jaxpr = jax.make_jaxpr(multi.multi_linear)(x, mw)
    assert str(jaxpr).count("dot_general") == 3


def test_per_row_adapters_equal_separate_runs(model) -> None:
    qbase, ads = model
    stacked = multi.stack_adapters(ads)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (5, 7)))
    ids = jnp.asarray([2, 0, -1, 1, 0], jnp.int32)
    run = jax.jit(lambda p, t, s, i: multi.forward(CFG, p, t, s, i))
    got = np.asarray(run(qbase, tokens, stacked, ids))
    single = jax.jit(lambda p, t, a: forward(CFG, p, t, adapters=a))
    plain = jax.jit(lambda p, t: forward(CFG, p, t))
    refs = [np.asarray(single(qbase, tokens, a)) for a in ads]
    base_ref = np.asarray(plain(qbase, tokens))
    for row, k in enumerate(np.asarray(ids)):
        ref = base_ref[row] if k < 0 else refs[k][row]
        np.testing.assert_allclose(got[row], ref, rtol=1e-5, atol=1e-5)
    # the adapters really differ from each other and from the base
    assert np.abs(refs[0][1] - refs[1][1]).max() > 1e-3
    assert np.abs(refs[0][1] - base_ref[1]).max() > 1e-3
    # switching adapters = new ids, same compiled program, base untouched
    ids2 = jnp.asarray([0, 1, 2, 0, -1], jnp.int32)
    got2 = np.asarray(run(qbase, tokens, stacked, ids2))
    for row, k in enumerate(np.asarray(ids2)):
        ref = base_ref[row] if k < 0 else refs[k][row]
        np.testing.assert_allclose(got2[row], ref, rtol=1e-5, atol=1e-5)
    assert run._cache_size() == 1


def test_per_row_generation_equals_separate_generation(model) -> None:
    """One batched decode serving a different adapter per prompt (and the bare base)."""
    from jaxlora import generate

    qbase, ads = model
    stacked = multi.stack_adapters(ads)
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(3, CFG.vocab_size, n)) for n in (5, 3, 6, 4)]
    ids = [1, -1, 0, 2]
    kw = dict(max_new_tokens=6, eos_id=-5)  # no EOS: every row runs the full length
    got = multi.generate_tokens(CFG, qbase, prompts, stacked, ids, **kw)
    for prompt, k, row in zip(prompts, ids, got, strict=True):
        adapters = None if k < 0 else ads[k]
        ref = generate.generate_tokens(CFG, qbase, [prompt], adapters=adapters, **kw)[0]
        assert row == ref
    alone = [generate.generate_tokens(CFG, qbase, [p], adapters=a, **kw)[0]
             for p, a in zip(prompts, ads, strict=False)]
    assert len({tuple(r) for r in alone + got}) > 1  # the adapters lead to different tokens


def test_stack_shapes_and_errors(model) -> None:
    qbase, ads = model
    st = lora.flatten_paths(multi.stack_adapters(ads))
    q = st["layers/attn/q_proj/kernel"]
    assert q.a.shape == (CFG.num_layers, 3, CFG.hidden_size, 4)  # padded to the max rank here
    assert q.scales[2] == 0.0  # adapter 2 does not target q_proj
    assert st["layers/mlp/up_proj/kernel"].a.shape[-1] == 8
    with pytest.raises(ValueError, match="at least one"):
        multi.stack_adapters([])
    emb = {"embed": {"embedding": lora.LoraPair(jnp.zeros((4, 2)), jnp.zeros((2, 3)), 1.0)}}
    with pytest.raises(ValueError, match="not a linear kernel"):
        multi.stack_adapters([emb])
    with pytest.raises(ValueError, match="ids must be"):
        multi.forward(
            CFG,
            qbase,
            jnp.zeros((2, 3), jnp.int32),
            multi.stack_adapters(ads),
            jnp.zeros((3,), jnp.int32),
        )
