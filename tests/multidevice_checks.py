"""Sharded training on 8 simulated CPU devices, against one device.

Not collected by the main test session (the file name does not start with ``test_``):
`tests/test_sharding.py::test_on_eight_simulated_devices` runs it in a subprocess whose
``XLA_FLAGS`` asks XLA for 8 host devices, which must be set before JAX starts its backend.

Tolerance: the sharded programs sum the same float32 numbers in other orders (per-device
partial sums, then all-reduces), so they agree closely, not bit for bit. Losses and held-out
losses: 1e-5 relative. Adapters and optimizer state after 3 Adam steps at lr 1e-2: 3e-6
absolute besides 1e-5 relative (measured up to 9.4e-7 on adapters of magnitude ~0.03; Adam's
m/sqrt(v) amplifies the rounding of gradients where v is tiny).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from conftest import write_tiny_config

from jaxlora import generate, sharding, train
from jaxlora.config import apply_overrides, load_config
from jaxlora.errors import ConfigError
from jaxlora.quant import QTensor

MESHES = {
    "data=8": (("data", 8),),
    "fsdp=8": (("fsdp", 8),),
    "data=2,fsdp=4": (("data", 2), ("fsdp", 4)),
    "fsdp=4,tensor=2": (("fsdp", 4), ("tensor", 2)),
}
STEPS = 3
RTOL = 1e-5
ADAPTER_ATOL = 3e-6  # Adam: m/sqrt(v) amplifies gradient rounding where v is tiny


def test_eight_devices_are_there():
    assert jax.device_count() == 8 and jax.default_backend() == "cpu"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    path = write_tiny_config(tmp_path_factory.mktemp("sharded"), "sharded", steps=4)
    return load_config(path, ["data.batch_size=8", "checkpoint.every=2", "eval.samples=[]"])


def _on(cfg, mesh_axes):
    return dataclasses.replace(cfg, sharding=sharding.ShardingSpec(mesh=mesh_axes))


def _train(cfg, mesh, steps, state=None, position=None):
    """`steps` train steps from `state` (default: the config's step 0) on `mesh` (None: one
    device, no shardings). Returns (losses, final state, the setup, the data position)."""
    s = train.setup(cfg, mesh)
    ds = train.make_datasets(cfg, s.loaded)
    it = ds.train.iterator(position)
    if state is not None:
        state = jax.device_put(state, s.shardings.state) if mesh is not None else state
    state = s.state if state is None else state
    step_fn = train.make_train_step(s.loaded.config, s.tx, dropout=False, shardings=s.shardings)
    place = (train.step.device_batch if mesh is None
             else functools.partial(sharding.put_batch, s.shardings.batch))
    losses = []
    last = train.train_loop(step_fn, state, s.base, it, steps=int(state.step) + steps,
                            hooks=[lambda info: losses.append(float(info.metrics.loss))],
                            place=place)
    return losses, last.state, s, it.state().as_dict()


@pytest.fixture(scope="module")
def reference(cfg):
    return _train(cfg, None, STEPS)


def _assert_close_trees(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("name", MESHES)
def test_sharded_steps_equal_one_device(cfg, reference, name):
    ref_losses, ref_state, _, _ = reference
    c = _on(cfg, MESHES[name])
    losses, state, s, _ = _train(c, sharding.make_mesh(c.sharding), STEPS)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert losses[-1] < losses[0]  # it trains (a test that could not fail otherwise)
    _assert_close_trees(state.adapters, ref_state.adapters, ADAPTER_ATOL)
    _assert_close_trees(state.opt_state, ref_state.opt_state, ADAPTER_ATOL)


@pytest.mark.parametrize("name", ["fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"])
def test_each_device_holds_its_share_of_the_packed_base(cfg, name):
    c = _on(cfg, MESHES[name])
    mesh = sharding.make_mesh(c.sharding)
    s = train.setup(c, mesh)
    n = sharding.weight_shards(mesh)
    qtensors = [q for q in jax.tree.leaves(s.base, is_leaf=lambda x: isinstance(x, QTensor))
                if isinstance(q, QTensor)]
    assert qtensors
    for q in qtensors:
        for arr in (q.codes, q.absmax):
            per_device = {sh.device: sh.data.nbytes for sh in arr.addressable_shards}
            assert len(per_device) == 8
            assert all(b * n == arr.nbytes for b in per_device.values()), (arr.shape, n)
            # a device's blocks are one contiguous range, the same for codes and scales
            idx = {sh.device: sh.index[-1] for sh in arr.addressable_shards}
            assert len({(i.start, i.stop) for i in idx.values()}) == n
    total = sum(x.nbytes for q in qtensors for x in (q.codes, q.absmax))
    on_one = sharding.device_bytes([(q.codes, q.absmax) for q in qtensors],
                                   [(q.codes.sharding, q.absmax.sharding) for q in qtensors])
    assert on_one * n == total


def test_checkpoint_moves_between_meshes_and_training_goes_on(cfg, tmp_path):
    """Saved on (data=2, fsdp=4), restored on (fsdp=8) and on one device: the next steps
    equal an uninterrupted run's."""
    full, _, _, _ = _train(cfg, None, 4)
    a = _on(cfg, MESHES["data=2,fsdp=4"])
    first, state, s, position = _train(a, sharding.make_mesh(a.sharding), 2)
    manager = train.assemble.checkpoint_manager(a, tmp_path, s)
    with manager:
        manager.save(2, state, data_position=position, metrics={}, force=True)
    for target in (MESHES["fsdp=8"], None):
        c = a if target is None else _on(cfg, target)
        mesh = None if target is None else sharding.make_mesh(c.sharding)
        s2 = train.setup(c, mesh)
        restored = train.assemble.checkpoint_manager(c, tmp_path, s2).restore(s2.state)
        rest, _, _, _ = _train(c, mesh, 2, state=restored.state, position=restored.data_position)
        np.testing.assert_allclose(first + rest, full, rtol=RTOL)


def test_eval_and_generation_on_a_mesh_equal_one_device(cfg, reference):
    _, ref_state, ref_setup, _ = reference
    c = _on(cfg, MESHES["fsdp=4,tensor=2"])
    mesh = sharding.make_mesh(c.sharding)
    s = train.setup(c, mesh)
    adapters = jax.device_put(ref_state.adapters, s.shardings.state.adapters)
    ds = train.make_datasets(c, s.loaded)
    ev = train.make_eval_step(s.loaded.config)
    place = functools.partial(sharding.put_batch, sharding.batch_sharding(mesh, accum=False))
    got = train.evaluate(ev, adapters, s.base, ds.validation.eval_batches(), 2, place=place)
    want = train.evaluate(ev, ref_state.adapters, ref_setup.base, ds.validation.eval_batches(), 2)
    assert got["val_tokens"] == want["val_tokens"] > 0
    np.testing.assert_allclose(got["val_loss"], want["val_loss"], rtol=RTOL)
    kw = dict(max_new_tokens=6)
    tok = s.loaded.tokenizer
    sharded = generate.generate(s.loaded.config, s.base, tok, ["the quick"], adapters=adapters, **kw)
    single = generate.generate(ref_setup.loaded.config, ref_setup.base, tok, ["the quick"],
                               adapters=ref_state.adapters, **kw)
    assert sharded == single


def test_run_end_to_end_on_a_mesh_then_export_on_one_device(cfg, tmp_path, capfd):
    from jaxlora import export

    c = apply_overrides(_on(cfg, MESHES["data=2,fsdp=4"]), [f"output_dir={tmp_path}"])
    summary = train.run(c)
    assert summary["steps"] == 4 and summary["val_loss"] < summary["val_loss_before"]
    assert "mesh data=2 x fsdp=4 x tensor=1 (8 cpu device(s)" in capfd.readouterr().err
    out = export.export(c.run_dir, "peft", tmp_path / "peft")
    assert (out / "adapter_model.safetensors").is_file()
    opened = train.open_run(c.run_dir)  # one device, no mesh
    assert opened.step == 4


def test_bad_meshes_and_batches_are_refused_before_anything_runs(cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"sharding.mesh: \{data=3\} needs 3 devices, but there are 8"):
        train.run(apply_overrides(_on(cfg, (("data", 3),)), [f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"data.batch_size: 4 rows cannot be split over data x fsdp = 2 x 4 = 8"):
        train.run(apply_overrides(_on(cfg, MESHES["data=2,fsdp=4"]),
                                  [f"output_dir={tmp_path}", "data.batch_size=4"]))
    with pytest.raises(ConfigError, match=r"fsdp x tensor = 8 does not divide the 1 quantization blocks of layers/attn/k_proj/kernel"):
        train.run(apply_overrides(_on(cfg, MESHES["fsdp=4,tensor=2"]),
                                  [f"output_dir={tmp_path}", "quant.block_size=4096"]))
    assert not any(tmp_path.iterdir())  # nothing written


# --------------------------------------------------------------------------------------------
# Populations on a mesh: members spread over a members axis, the base FSDP-sharded
# --------------------------------------------------------------------------------------------
POP_MESHES = {  # name -> (mesh axes, layout)
    "members=2,data=2,fsdp=2 rows": ((("members", 2), ("data", 2), ("fsdp", 2)), "rows"),
    "members=4,fsdp=2 rows": ((("members", 4), ("fsdp", 2)), "rows"),
    "fsdp=8 members": ((("fsdp", 8),), "members"),
}


def _members():
    from jaxlora import optim, population
    from jaxlora.lora import LoraSpec

    return [population.Member(LoraSpec(rank=r, alpha=2.0 * r, scaling=s),
                              optim.OptimSpec(lr=lr, schedule="constant"), seed)
            for seed, (r, s, lr) in enumerate([(2, "standard", 1e-2), (8, "rslora", 3e-3),
                                               (4, "standard", 2e-2), (1, "rslora", 5e-3)])]


def _population(cfg, mesh_axes, layout):
    """STEPS population steps of `_members()` on a mesh (None: one device). (losses, state)."""
    from jaxlora import population

    loaded = train.load_base(cfg)
    state, txs = population.init(loaded.base, _members(), STEPS)
    base, mesh = loaded.base, None
    if mesh_axes is not None:
        mesh = sharding.make_mesh(sharding.ShardingSpec(mesh=mesh_axes))
        base = jax.device_put(base, sharding.base_shardings(mesh, base))
        state = jax.device_put(state, sharding.replicated(mesh, state))
    step = population.make_step(loaded.config, txs, layout=layout, mesh=mesh)
    it = train.make_datasets(cfg, loaded).train.iterator()
    losses = []
    for _ in range(STEPS):
        batch = train.step.stack_batches([next(it)])
        batch = (train.step.device_batch(batch) if mesh is None
                 else sharding.put_batch(sharding.batch_sharding(mesh), batch))
        state, m = step(state, base, batch)
        losses.append(np.asarray(m.loss))
    return np.stack(losses), state, base


@pytest.mark.parametrize("name", POP_MESHES)
def test_a_population_on_a_mesh_equals_one_device(cfg, name):
    mesh_axes, layout = POP_MESHES[name]
    want, ref, _ = _population(cfg, None, layout)
    got, state, base = _population(cfg, mesh_axes, layout)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert want[-1].mean() < want[0].mean()
    _assert_close_trees([m.adapters for m in state.members], [m.adapters for m in ref.members],
                        ADAPTER_ATOL)
    fsdp = dict(mesh_axes).get("fsdp", 1)
    codes = base["layers"]["attn"]["q_proj"]["kernel"].codes
    assert codes.addressable_shards[0].data.size * fsdp == codes.size  # the base is split


def test_a_population_mesh_that_does_not_fit_is_refused(cfg, tmp_path):
    from jaxlora import population

    loaded = train.load_base(cfg)
    _, txs = population.init(loaded.base, _members(), STEPS)
    three = sharding.make_mesh(sharding.ShardingSpec(mesh=(("members", 3),)), jax.devices()[:3])
    with pytest.raises(ConfigError, match=r"sharding.mesh.members = 3 does not divide the "
                                          r"population's 4 members"):
        population.make_step(loaded.config, txs, mesh=three)
    two = sharding.make_mesh(sharding.ShardingSpec(mesh=(("members", 2), ("fsdp", 4))))
    with pytest.raises(ConfigError, match="needs the 'rows' population layout"):
        population.make_step(loaded.config, txs, layout="members", mesh=two)
    with pytest.raises(ConfigError, match=r"sharding.mesh.members = 2: a members axis splits a "
                                          r"population's members"):
        train.run(apply_overrides(_on(cfg, (("members", 2), ("fsdp", 4))),
                                  [f"output_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())


def test_population_runs_on_a_members_mesh_like_on_one_device(cfg, tmp_path):
    from jaxlora import population

    def configs(tag, mesh_axes):
        base = apply_overrides(cfg, [f"output_dir={tmp_path / tag}", "train.steps=2"])
        if mesh_axes:
            base = _on(base, mesh_axes)
        return [apply_overrides(base, [f"name=m{i}", f"lora.rank={r}", f"optim.lr={lr}"])
                for i, (r, lr) in enumerate([(2, 1e-2), (4, 3e-3)])]

    one = population.run(configs("one", None))
    spread = population.run(configs("mesh", (("members", 2), ("fsdp", 4))))
    for a, b in zip(spread, one, strict=True):
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=RTOL)
        assert a["steps"] == b["steps"] == 2
