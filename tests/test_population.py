"""jaxlora.population: K members in one step equal K runs alone; a diverging member is frozen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_tiny_config

from jaxlora import optim, population, train
from jaxlora.config import load_config
from jaxlora.errors import ConfigError
from jaxlora.lora import LoraSpec

STEPS = 4
QV = ("q_proj", "v_proj")
MEMBERS = [  # rank, alpha, scaling, learning rate, seed and targets all differ
    population.Member(LoraSpec(rank=2, alpha=4.0), optim.OptimSpec(lr=1e-2, schedule="constant"), 0),
    population.Member(LoraSpec(rank=8, alpha=8.0, scaling="rslora"),
                      optim.OptimSpec(lr=3e-3, schedule="constant"), 1),
    population.Member(LoraSpec(rank=4, alpha=16.0, targets=QV),
                      optim.OptimSpec(lr=2e-2, warmup_steps=1, schedule="cosine"), 2),
    population.Member(LoraSpec(rank=1, alpha=2.0), optim.OptimSpec(name="sgd", lr=0.1), 3),
]


@pytest.fixture(scope="module", params=["none", "nf4"])
def kit(request, tmp_path_factory):
    path = write_tiny_config(tmp_path_factory.mktemp("pop"), "pop", qtype=request.param)
    cfg = load_config(path, ["data.batch_size=2"])
    loaded = train.load_base(cfg)
    ds = train.make_datasets(cfg, loaded)
    batches = [next(it) for it in [ds.train.iterator()] for _ in range(STEPS)]
    return loaded, batches


def _alone(loaded, member, batches):
    """The member trained by itself with the single-run step (what `jaxlora train` runs)."""
    from jaxlora import lora

    tx = optim.make_optimizer(member.optim, STEPS)
    state = train.init_state(lora.init(jax.random.key(member.seed), loaded.base, member.lora),
                             tx, member.seed)
    step = train.make_train_step(loaded.config, tx, dropout=False)
    losses = []
    for b in batches:
        state, m = step(state, loaded.base, train.step.device_batch(train.step.stack_batches([b])))
        losses.append(float(m.loss))
    return np.asarray(losses), state.adapters


def test_members_equal_runs_alone(kit):
    loaded, batches = kit
    res = population.train(loaded.config, loaded.base, MEMBERS, iter(batches), steps=STEPS)
    assert res.losses.shape == (STEPS, len(MEMBERS)) and not res.diverged.any()
    for k, member in enumerate(MEMBERS):
        losses, adapters = _alone(loaded, member, batches)
        np.testing.assert_allclose(res.losses[:, k], losses, rtol=1e-5)
        assert losses[-1] < losses[0]
        got, want = jax.tree.leaves(res.adapters[k]), jax.tree.leaves(adapters)
        start = jax.tree.leaves(population.init(loaded.base, [member], STEPS)[0].members[0].adapters)
        assert [x.shape for x in got] == [x.shape for x in want]  # its own rank, not padded
        for x, y, x0 in zip(got, want, start, strict=True):
            # float32 in other summation orders: Adam's m/sqrt(v) turns 1e-7 gradient rounding
            # into larger differences where v is tiny, so compare what training moved (the
            # delta from init) norm-wise: a wrong scale, rate or row would be O(1) off (A moves
            # least: its first gradient is exactly zero while B = 0)
            moved_pop, moved_alone = np.asarray(x) - np.asarray(x0), np.asarray(y) - np.asarray(x0)
            err = np.linalg.norm(moved_pop - moved_alone) / np.linalg.norm(moved_alone)
            assert err < 1e-3, (k, x.shape, err)  # measured up to 2.4e-4 (A of rank 8)


def test_a_diverging_member_is_frozen_and_the_others_unchanged(kit):
    loaded, batches = kit
    absurd = population.Member(LoraSpec(rank=4), optim.OptimSpec(lr=1e30, schedule="constant",
                                                                  max_grad_norm=0.0), 7)
    with_it = population.train(loaded.config, loaded.base, [*MEMBERS[:2], absurd], iter(batches),
                               steps=STEPS)
    without = population.train(loaded.config, loaded.base, MEMBERS[:2], iter(batches),
                               steps=STEPS)
    assert with_it.diverged.tolist() == [False, False, True]
    np.testing.assert_allclose(with_it.losses[:, :2], without.losses, rtol=1e-6)
    first_bad = int(np.argmax(~np.isfinite(with_it.losses[:, 2])))
    assert np.isfinite(with_it.losses[:first_bad, 2]).all()
    frozen = with_it.adapters[2]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(frozen))


def test_refused_members(kit):
    loaded, _ = kit
    with pytest.raises(ConfigError, match="pissa"):
        population.check_members(loaded.base, [population.Member(
            LoraSpec(init="pissa"), optim.OptimSpec())], loaded.config)
    with pytest.raises(ConfigError, match="embedding"):
        population.check_members(loaded.base, [population.Member(
            LoraSpec(targets=r"embed/embedding"), optim.OptimSpec())], loaded.config)
    with pytest.raises(ConfigError, match="no members"):
        population.check_members(loaded.base, [], loaded.config)


def test_padded_rank_columns_stay_zero(kit):
    """Member 0 (rank 2) inside a rank-8 stack: the padding never moves (exact masking)."""
    loaded, batches = kit
    from jaxlora import multi

    res = population.train(loaded.config, loaded.base, MEMBERS[:2], iter(batches), steps=2)
    stacked = multi.stack_adapters(res.adapters)
    a = stacked["layers"]["attn"]["q_proj"]["kernel"].a  # [L, K, in, r_max]
    assert a.shape[-1] == 8 and not jnp.any(a[:, 0, :, 2:])
    assert jnp.any(a[:, 0, :, :2]) and jnp.any(a[:, 1])
