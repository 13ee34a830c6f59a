"""The memory planner: its terms against the arrays a run really holds and against XLA's
buffer assignment of the compiled train step (`compile().memory_analysis()`), and `jaxlora plan`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from conftest import write_tiny_config

from jaxlora import cli, data, optim, plan, population, train
from jaxlora.config import load_config
from jaxlora.models import ModelConfig
from jaxlora.train.assemble import setup

# Wide enough that activations, not fixed buffers, make up the step's temporaries.
MID = ModelConfig.tiny_llama(hidden_size=256, intermediate_size=768, num_heads=4,
                             num_kv_heads=2, head_dim=64, num_layers=4, name="mid")


def _nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def _cfg(tmp_path, *overrides: str):
    return load_config(write_tiny_config(tmp_path, "p"), overrides=list(overrides))


@pytest.mark.parametrize("qtype", ["nf4", "none"])
@pytest.mark.parametrize("rank", [2, 8])
def test_base_adapter_and_optimizer_terms_are_the_arrays_of_a_run(tmp_path, qtype, rank):
    cfg = _cfg(tmp_path, f"quant.qtype={qtype}", f"lora.rank={rank}")
    p = plan.plan(cfg, platform="cpu", devices=1)
    s = setup(cfg)  # what `jaxlora train` builds: the loaded base, adapters, AdamW state
    assert p.base == _nbytes(s.base)
    assert p.adapters == p.gradients == _nbytes(s.state.adapters)
    assert p.optimizer == _nbytes(s.state.opt_state)


def _compiled(cfg, mcfg):
    """XLA's memory analysis of the train step of `cfg` on `mcfg`'s shapes (abstract inputs)."""
    base, adapters, _ = plan._abstract_state(cfg, mcfg)
    tx = optim.make_optimizer(cfg.optim, total_steps=cfg.train.steps)
    state = jax.eval_shape(lambda a: train.init_state(a, tx, 0), adapters)
    shape = (1, cfg.data.batch_size, cfg.data.seq_len)
    i32 = jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = data.Batch(i32, i32, jax.ShapeDtypeStruct(shape, jnp.float32), i32, i32)
    step = train.make_train_step(mcfg, tx, remat=cfg.model.remat, dropout=False)
    return step.lower(state, base, batch).compile().memory_analysis()


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "dots", "attn", "full"])
def test_step_terms_against_the_compiled_step(tmp_path, remat):
    cfg = _cfg(tmp_path, f"model.remat={remat}", "data.batch_size=2", "data.seq_len=128")
    ma = {n: _compiled(cfg, dataclasses.replace(MID, num_layers=n)) for n in (2, 4)}
    p2, p4 = (plan.plan(cfg, mcfg=dataclasses.replace(MID, num_layers=n), platform="cpu",
                        devices=1) for n in (2, 4))
    step_and_key = 4 + 8  # TrainState.step (int32) and rng (uint32 [2]): not planned
    assert ma[4].argument_size_in_bytes == (p4.base + p4.adapters + p4.optimizer + p4.batch
                                            + step_and_key)
    temp = p4.gradients + p4.activations + p4.layer + p4.logits
    kept = ma[4].temp_size_in_bytes - ma[2].temp_size_in_bytes  # two more layers' share
    print(remat, temp / ma[4].temp_size_in_bytes, (p4.activations - p2.activations) / kept)
    assert abs(temp / ma[4].temp_size_in_bytes - 1) < 0.25
    assert abs((p4.activations - p2.activations) / kept - 1) < 0.25


def test_remat_policies_order_the_activations(tmp_path):
    acts = {r: plan.plan(_cfg(tmp_path, f"model.remat={r}"), mcfg=MID, platform="cpu",
                         devices=1).activations for r in ("none", "dots", "attn", "full")}
    assert acts["none"] > acts["attn"] > acts["dots"] > acts["full"] > 0


def test_sequence_length_grows_attention_quadratically(tmp_path):
    act = lambda t: plan.plan(_cfg(tmp_path, "model.remat=none", f"data.seq_len={t}"),
                              mcfg=MID, platform="cpu", devices=1).activations
    linear = act(64) * 2
    assert act(128) > linear  # the [heads, T, T] scores add more than twice
    kept = lambda t: plan.plan(_cfg(tmp_path, "model.remat=full", f"data.seq_len={t}"),
                               mcfg=MID, platform="cpu", devices=1).activations
    assert kept(128) == 2 * kept(64)  # the block inputs alone: linear in T


def test_population_and_mesh_shares(tmp_path):
    cfg = _cfg(tmp_path, "data.batch_size=8")
    one = plan.plan(cfg, platform="cpu", devices=1)
    members = plan.plan(cfg, 4, platform="cpu", devices=1, layout="members")
    rows = plan.plan(cfg, 4, platform="cpu", devices=1, layout="rows")
    assert members.base == one.base and members.activations == one.activations
    assert members.adapters == 4 * one.adapters and members.optimizer == 4 * one.optimizer
    assert rows.activations == 4 * one.activations
    fsdp = plan.plan(dataclasses.replace(cfg, sharding=dataclasses.replace(
        cfg.sharding, mesh=(("fsdp", 4),))), platform="gpu", devices=4)
    data_ = plan.plan(dataclasses.replace(cfg, sharding=dataclasses.replace(
        cfg.sharding, mesh=(("data", 4),))), platform="gpu", devices=4)
    assert fsdp.base == one.base // 4 and data_.base == one.base  # fsdp splits, data replicates
    assert fsdp.activations == data_.activations  # both split the rows 4 ways
    assert fsdp.runtime == 0 and fsdp.peak == fsdp.step == fsdp.device  # accelerator: 1 device
    cpu = plan.plan(dataclasses.replace(cfg, sharding=dataclasses.replace(
        cfg.sharding, mesh=(("data", 4),))), platform="cpu", devices=4)
    assert cpu.step == cpu.runtime + 4 * cpu.device  # CPU devices share the host's memory


def test_population_estimate_is_the_plan(tmp_path):
    from jaxlora import io

    cfg = _cfg(tmp_path)
    mcfg = io.model_config(cfg.model.name)
    for k in (1, 3):
        assert population.estimate_bytes(cfg, mcfg, k) == plan.plan(cfg, k, mcfg=mcfg).peak


def test_format_lists_every_term(tmp_path):
    p = plan.plan(_cfg(tmp_path), platform="cpu", devices=1)
    text = plan.format_plan(p, "attn")
    for name in ("base", "adapters", "gradients", "optimizer state", "activations (remat attn)",
                 "one block's backward", "loss logits chunk", "runtime", "train step peak",
                 "load peak", "predicted peak"):
        assert name in text
    assert f"{p.peak / 2**20:,.1f} MiB" in text


def test_cli_plan(tmp_path, capsys):
    path = write_tiny_config(tmp_path, "p")
    assert cli.main(["plan", str(path), "--population-size", "2", "--platform", "gpu",
                     "--set", "lora.rank=16"]) == 0
    out = capsys.readouterr().out
    assert "memory plan (gpu memory" in out and "population 2" in out
    assert "runtime" not in out  # an accelerator's memory holds no Python
    assert cli.main(["plan", str(path), "--set", "lora.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlora: error:") and "lora.rank" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_inits_that_build_adapters_from_the_base_plan_like_any_init(tmp_path, init):
    """PiSSA and LoftQ adapters have the shapes of any init's: the plan (printed before every
    run) must not refuse them, and its terms equal the default init's."""
    assert plan.plan(_cfg(tmp_path, f"lora.init={init}")) == plan.plan(_cfg(tmp_path))
