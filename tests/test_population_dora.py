"""DoRA and LoRA+ members of a population equal the same runs alone (the members layout)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_population import STEPS, _alone, kit  # noqa: F401 (kit: the fixture)

from jaxlora import optim, population
from jaxlora.errors import ConfigError
from jaxlora.lora import LoraSpec

DORA = [  # ranks, scaling, learning rates, LoRA+ ratios and seeds differ; the targets agree
    population.Member(LoraSpec(rank=2, alpha=4.0, method="dora"),
                      optim.OptimSpec(lr=1e-2, schedule="constant"), 0),
    population.Member(LoraSpec(rank=4, alpha=8.0, scaling="rslora", method="dora"),
                      optim.OptimSpec(lr=3e-3, schedule="constant", lora_plus_ratio=4.0), 1),
]


def test_dora_members_equal_runs_alone(kit):  # noqa: F811
    loaded, batches = kit
    res = population.train(loaded.config, loaded.base, DORA, iter(batches), steps=STEPS,
                           layout="members")
    assert not res.diverged.any()
    for k, member in enumerate(DORA):
        losses, adapters = _alone(loaded, member, batches)
        np.testing.assert_allclose(res.losses[:, k], losses, rtol=1e-5)
        assert losses[-1] < losses[0]
        start = jax.tree.leaves(population.init(loaded.base, [member], STEPS)[0].members[0].adapters)
        got, want = jax.tree.leaves(res.adapters[k]), jax.tree.leaves(adapters)
        assert len(got) == 3 * 7  # a, b and the magnitude m of each of the 7 linear kinds
        for x, y, x0 in zip(got, want, start, strict=True):
            moved_pop, moved_alone = np.asarray(x) - np.asarray(x0), np.asarray(y) - np.asarray(x0)
            err = np.linalg.norm(moved_pop - moved_alone) / np.linalg.norm(moved_alone)
            assert err < 1e-3, (k, x.shape, err)


def test_dora_mixes_only_with_dora_of_the_same_targets(kit):  # noqa: F811
    loaded, batches = kit
    plain = population.Member(LoraSpec(rank=2), optim.OptimSpec(), 2)
    fewer = population.Member(LoraSpec(rank=2, method="dora", targets=("q_proj",)),
                              optim.OptimSpec(), 3)
    for other in (plain, fewer):
        with pytest.raises(ConfigError, match="DoRA members share a population only with DoRA"):
            population.check_members(loaded.base, [DORA[0], other], loaded.config)
    with pytest.raises(ValueError, match="the per-row path has no DoRA"):
        population.train(loaded.config, loaded.base, DORA, iter(batches), steps=1, layout="rows")
