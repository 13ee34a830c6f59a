"""jaxlora.population: K members in one step equal K runs alone; a diverging member is frozen."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_tiny_config

from jaxlora import optim, population, train
from jaxlora.config import apply_overrides, load_config
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


@pytest.mark.parametrize("layout", population.LAYOUTS)
def test_members_equal_runs_alone(kit, layout):
    loaded, batches = kit
    res = population.train(loaded.config, loaded.base, MEMBERS, iter(batches), steps=STEPS,
                           layout=layout)
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


@pytest.mark.parametrize("layout", population.LAYOUTS)
def test_a_diverging_member_is_frozen_and_the_others_unchanged(kit, layout):
    loaded, batches = kit
    absurd = population.Member(LoraSpec(rank=4), optim.OptimSpec(lr=1e30, schedule="constant",
                                                                  max_grad_norm=0.0), 7)
    with_it = population.train(loaded.config, loaded.base, [*MEMBERS[:2], absurd], iter(batches),
                               steps=STEPS, layout=layout)
    without = population.train(loaded.config, loaded.base, MEMBERS[:2], iter(batches),
                               steps=STEPS, layout=layout)
    assert with_it.diverged.tolist() == [False, False, True]
    np.testing.assert_allclose(with_it.losses[:, :2], without.losses, rtol=1e-6)
    first_bad = int(np.argmax(~np.isfinite(with_it.losses[:, 2])))
    assert np.isfinite(with_it.losses[:first_bad, 2]).all()
    frozen = with_it.adapters[2]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(frozen))


def test_dropout_of_each_member_in_the_members_layout(kit):
    loaded, batches = kit
    plain = MEMBERS[:2]
    drop = lambda m: m._replace(lora=dataclasses.replace(m.lora, dropout=0.5))  # noqa: E731
    run = lambda ms: population.train(loaded.config, loaded.base, ms, iter(batches),  # noqa: E731
                                      steps=STEPS, layout="members").losses
    without = run(plain)
    mixed = run([plain[0], drop(plain[1])])  # the rates differ: the per-row path
    np.testing.assert_allclose(mixed[:, 0], without[:, 0], rtol=1e-5)  # rate 0: untouched
    assert not np.allclose(mixed[1:, 1], without[1:, 1], rtol=1e-4)  # rate 0.5 acts
    both = run([drop(m) for m in plain])  # one rate: each member through the folded path
    assert np.isfinite(both).all()
    assert not np.allclose(both[1:], without[1:], rtol=1e-4)
    np.testing.assert_allclose(both[0], without[0], rtol=1e-5)  # B = 0: dropout changes nothing yet


@pytest.mark.parametrize("layout", population.LAYOUTS)
def test_held_out_curve_of_each_member(kit, layout):
    """`train(eval_batches=...)`: each member's held-out loss before, every `eval_every`
    steps and at the end equals a run alone's `train.evaluate` of the same adapters."""
    loaded, batches = kit
    held = batches[-2:]
    res = population.train(loaded.config, loaded.base, MEMBERS[:2], iter(batches), steps=STEPS - 1,
                           layout=layout, eval_batches=held, eval_every=2)
    assert res.val_steps.tolist() == [0, 2, 3] and res.val_losses.shape == (3, 2)
    ev = train.make_eval_step(loaded.config)
    alone = lambda ads: train.evaluate(ev, ads, loaded.base, iter(held), len(held))["val_loss"]  # noqa: E731
    np.testing.assert_allclose(res.val_losses[0], alone(None), rtol=1e-6)  # B = 0: the base
    for k, ads in enumerate(res.adapters):
        np.testing.assert_allclose(res.val_losses[-1, k], alone(ads), rtol=1e-5)
    assert (res.val_losses[-1] != res.val_losses[0]).all()  # training moved them
    plain = population.train(loaded.config, loaded.base, MEMBERS[:2], iter(batches), steps=1)
    assert plain.val_steps.shape == (0,) and plain.val_losses.shape == (0, 2)


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


# --------------------------------------------------------------------------------------------
# Run directories: a population of configs against `train.run` of each
# --------------------------------------------------------------------------------------------
_TIMING = ("tokens_per_s", "elapsed_s")
RUN_MEMBERS = [  # rank, alpha, scaling, learning rate and the data seed (own streams) differ
    ["lora.rank=2", "lora.alpha=4.0", "optim.lr=0.01"],
    ["lora.rank=8", "lora.scaling='rslora'", "optim.lr=0.003", "data.seed=1"],
    ["lora.rank=4", "lora.alpha=16.0", "optim.lr=0.02", "data.seed=2"],
]


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in _TIMING} for x in lines if x]


def _member_configs(tmp_path, tag):
    path = write_tiny_config(tmp_path / tag, "base", steps=4)
    return [apply_overrides(load_config(path, ov), [f"name=m{i}", "data.shuffle=true"])
            for i, ov in enumerate(RUN_MEMBERS)]


def test_population_run_dirs_equal_runs_alone(tmp_path):
    pop = _member_configs(tmp_path, "pop")
    alone = _member_configs(tmp_path, "alone")
    summaries = population.run(pop)
    for cfg_p, cfg_a, s in zip(pop, alone, summaries, strict=True):
        ref = train.run(cfg_a)
        got, want = _records(cfg_p.run_dir), _records(cfg_a.run_dir)
        assert [sorted(r) for r in got] == [sorted(r) for r in want]  # same records, same order
        for g, w in zip(got, want, strict=True):
            for key in ("loss", "val_loss"):
                if key in w:
                    np.testing.assert_allclose(g[key], w[key], rtol=1e-5)
        assert s["steps"] == ref["steps"] == 4 and s["adapter_params"] == ref["adapter_params"]
        np.testing.assert_allclose(s["val_loss"], ref["val_loss"], rtol=1e-5)
        a, b = train.open_run(cfg_p.run_dir), train.open_run(cfg_a.run_dir)  # as a run alone
        for x, y in zip(jax.tree.leaves(a.adapters), jax.tree.leaves(b.adapters), strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)
    assert population.run(pop) == summaries  # finished: read back, nothing trained again


def _sigterm_after(monkeypatch, n):
    """SIGTERM this process after the `n`-th step of the next compiled step; returns the
    real `compile_step` to put back."""
    real = train.loop.compile_step

    def compile_step(*args):
        step = real(*args)
        calls = {"n": 0}

        def wrapped(*a):
            out = step(*a)
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        return wrapped

    monkeypatch.setattr(train.loop, "compile_step", compile_step)
    return real


def test_population_interrupted_then_resumed(tmp_path, monkeypatch):
    cfgs = [apply_overrides(c, ["checkpoint.every=2"]) for c in _member_configs(tmp_path, "a")]
    full = population.run([apply_overrides(c, [f"output_dir={tmp_path / 'full'}"]) for c in cfgs])
    real = _sigterm_after(monkeypatch, 2)
    assert population.run(cfgs) == [{"stopped": "SIGTERM", "step": 2}] * len(cfgs)
    assert not any((c.run_dir / "summary.json").exists() for c in cfgs)
    monkeypatch.setattr(train.loop, "compile_step", real)
    resumed = population.run(cfgs)
    for c, f, r in zip(cfgs, full, resumed, strict=True):
        np.testing.assert_allclose(r["val_loss"], f["val_loss"], rtol=1e-6)
        steps = [x["step"] for x in _records(c.run_dir) if "loss" in x]
        assert steps == sorted(set(steps))  # every logged step once


def test_members_that_need_different_bases_are_refused(tmp_path):
    cfgs = _member_configs(tmp_path, "bad")
    cfgs[1] = apply_overrides(cfgs[1], ["quant.qtype=int8"])
    with pytest.raises(ConfigError, match=r"population: quant.qtype differs between m0 \('nf4'\) and m1 \('int8'\)"):
        population.run(cfgs)
    cfgs[1] = apply_overrides(cfgs[1], ["quant.qtype=nf4", "data.seq_len=16"])
    with pytest.raises(ConfigError, match="data.seq_len differs"):
        population.run(cfgs)
    cfgs[1] = apply_overrides(cfgs[1], ["data.seq_len=32", "train.seed=3"])
    with pytest.raises(ConfigError, match="train.seed differs"):  # a random model's weights
        population.run(cfgs)
    assert not any(c.run_dir.exists() for c in cfgs)  # refused before anything is written


# --------------------------------------------------------------------------------------------
# Sweeps as populations
# --------------------------------------------------------------------------------------------
def _rank_sweep(tmp_path):
    write_tiny_config(tmp_path, "tiny", steps=4)
    p = tmp_path / "sw.toml"
    p.write_text('base = "tiny.toml"\n[set]\n"eval.samples" = []\n"checkpoint.every" = 2\n'
                 '[grid]\n"lora.rank" = [2, 4]\n"lora.scaling" = ["standard", "rslora"]\n')
    return p


def _table(result):
    return {r.name: r.metrics for r in result.runs}


def test_sweep_as_populations_equals_one_at_a_time(tmp_path):
    from jaxlora import sweep

    sw = _rank_sweep(tmp_path)
    logs: list[str] = []
    pop = sweep.run_sweep(sw, train.run, out_dir=tmp_path / "pop", population=population,
                          log=logs.append)
    alone = sweep.run_sweep(sw, train.run, out_dir=tmp_path / "alone", population=population,
                            population_size=1, log=None)
    assert any(line.startswith("population of 4: ") for line in logs), logs
    a, b = _table(pop), _table(alone)
    assert a.keys() == b.keys() and len(a) == 4
    assert all(r.status == "done" for r in (*pop.runs, *alone.runs))
    for name in a:
        for key in ("val_loss", "train_loss", "val_loss_before"):
            np.testing.assert_allclose(a[name][key], b[name][key], rtol=1e-5)
        assert a[name]["adapter_bytes"] == b[name]["adapter_bytes"]
    header = (tmp_path / "pop" / "results.md").read_text().splitlines()[0]
    assert header == (tmp_path / "alone" / "results.md").read_text().splitlines()[0]


def test_interrupted_population_sweep_resumes_and_finishes(tmp_path, monkeypatch, capfd):
    from jaxlora import sweep

    sw = _rank_sweep(tmp_path)
    full = _table(sweep.run_sweep(sw, train.run, out_dir=tmp_path / "full",
                                  population=population, log=None))
    real = _sigterm_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(sw, train.run, out_dir=tmp_path / "cut", population=population, log=None)
    monkeypatch.setattr(train.loop, "compile_step", real)
    assert "population saved at step 3" in capfd.readouterr().err  # the stop's own checkpoint
    again = sweep.run_sweep(sw, train.run, out_dir=tmp_path / "cut", population=population,
                            log=None)
    assert "jaxlora: population resumed at step 3" in capfd.readouterr().err
    assert all(r.status == "done" and not r.skipped for r in again.runs)
    cut = _table(again)
    assert cut.keys() == full.keys()
    for name in full:
        np.testing.assert_allclose(cut[name]["val_loss"], full[name]["val_loss"], rtol=1e-6)


def test_population_size_from_the_memory_estimate(tmp_path):
    cfg = load_config(write_tiny_config(tmp_path, "t"))
    from jaxlora import io

    mcfg = io.model_config("tiny-llama")
    one, eight = (population.estimate_bytes(cfg, mcfg, k) for k in (1, 8))
    assert one < eight < 8 * one  # the base is shared
    rows = population.estimate_bytes(cfg, mcfg, 8, layout="rows")
    assert eight <= rows  # "rows" holds every member's activations at once
    assert population.plan_size(cfg, None, budget=eight) == 8  # the largest that fits
    assert population.plan_size(cfg, 3, budget=eight) == 3
    with pytest.raises(ConfigError, match=r"population_size: 9 members of tiny-llama need an "
                                          r"estimated .* GiB, .* GiB are available; at most 8 fit"):
        population.plan_size(cfg, 9, budget=eight)
