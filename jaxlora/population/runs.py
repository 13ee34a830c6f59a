"""Populations of run directories: which configs can share a population, how much memory
one needs, and `run`, which trains them into run directories like `jaxlora train` writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxlora import data as data_lib
from jaxlora import lora, memory
from jaxlora.errors import ConfigError
from jaxlora.population.step import (
    Member,
    PopulationState,
    check_members,
    init,
    make_eval_step,
    make_step,
)

__all__ = [
    "MEMBER_KEYS", "check_shared", "group_key", "estimate_bytes", "memory_budget", "plan_size",
    "run",
]

# --------------------------------------------------------------------------------------------
# Which runs can share one population
# --------------------------------------------------------------------------------------------
MEMBER_KEYS = ("name", "output_dir", "lora", "optim", "train.seed", "train.log_every",
               "train.progress", "train.tensorboard", "data.seed", "eval.samples", "eval.max_new_tokens",
               "eval.temperature", "checkpoint")
"""Config keys (and sections) a member may set for itself; every other key is the
population's: the base (model, quant), the batch shape (data), the step (train.steps,
grad_accum), the evaluation schedule and the mesh."""


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _is_member_key(key: str, random_model: bool) -> bool:
    if key == "train.seed" and random_model:  # a random model's weights come from it
        return False
    return any(key == m or key.startswith(m + ".") for m in MEMBER_KEYS)


def check_shared(configs: Sequence[Any]) -> None:
    """Raise ConfigError naming the first key that differs between members and must not.

    A random test model (`tiny-*`) draws its weights from `train.seed`, so there the seed is
    the base's too.
    """
    from jaxlora.config import to_dict
    from jaxlora.io import RANDOM_MODELS

    if not configs:
        raise ConfigError("population: no members")
    flats = [_flat(to_dict(c)) for c in configs]
    random_model = configs[0].model.name in RANDOM_MODELS
    for key in flats[0]:
        if _is_member_key(key, random_model):
            continue
        for j, f in enumerate(flats[1:], start=1):
            if f.get(key) != flats[0][key]:
                raise ConfigError(
                    f"population: {key} differs between {configs[0].name} ({flats[0][key]!r}) "
                    f"and {configs[j].name} ({f.get(key)!r}); members share one base and one "
                    f"step, so only {', '.join(MEMBER_KEYS[2:])} may differ")


def estimate_bytes(cfg: Any, mcfg: Any, k: int, layout: str | None = None) -> int:
    """Peak memory of a population of `k` members of `cfg` (host RSS on CPU), nothing loaded.

    The memory planner's prediction (`jaxlora.plan.plan`): the shared base once; per member
    adapters, gradients and optimizer state; the activations of one member's rows (layout
    "members") or of all k ("rows") as the remat policy keeps them, and the logits chunk.
    """
    from jaxlora import plan

    return plan.plan(cfg, k, mcfg=mcfg, layout=layout).peak


# --------------------------------------------------------------------------------------------
# A population of run directories (what `jaxlora sweep` runs)
# --------------------------------------------------------------------------------------------
class _Member(NamedTuple):
    """One member's run: its config, folder, setup view, checkpoints, data and log."""

    cfg: Any
    run_dir: Path
    setup: Any  # train.assemble.Setup over the shared base
    manager: Any
    datasets: Any
    log: Any  # loop.MetricsLog (its file is opened by `run`)


def _rows_of(iterators: Sequence[Iterator[data_lib.Batch]]) -> Iterator[data_lib.Batch]:
    """The members' own batches side by side: member k's rows at `[k*B, (k+1)*B)`."""
    while True:
        parts = [next(it) for it in iterators]
        yield data_lib.Batch(*(np.concatenate(xs) for xs in zip(*parts, strict=True)))


def _view(info: Any, k: int, shared: bool) -> Any:
    """Member k's share of a population `StepInfo`, shaped like a single run's."""
    from jaxlora.train.step import StepMetrics

    m = info.metrics
    tokens = info.tokens if shared else info.tokens / len(info.state.members)
    return info._replace(state=info.state.members[k], tokens=tokens,
                         metrics=StepMetrics(m.loss[k], m.tokens[k], m.grad_norm[k], m.finite[k]))


def run(configs: Sequence[Any], run_dirs: Sequence[str | os.PathLike] | None = None,
        ) -> list[dict[str, Any]]:
    """Train the runs of `configs` as one population into their own run directories.

    Each member's directory is what `jaxlora train` of its config writes (config.toml,
    metrics.jsonl, checkpoints, summary.json, loss.png, samples.txt), so `eval`, `export` and
    `generate --adapter` work on it as on a run trained alone; finished members are skipped,
    and a population interrupted after a checkpoint resumes from it. Returns the summaries.
    """
    from jaxlora.train import runs

    configs = list(configs)
    dirs = [Path(d) for d in run_dirs] if run_dirs is not None else [c.run_dir for c in configs]
    check_shared(configs)
    resuming = [runs.check_run_dir(c, d) for c, d in zip(configs, dirs, strict=True)]
    done = [r and (d / "summary.json").exists() for r, d in zip(resuming, dirs, strict=True)]
    todo = [i for i, f in enumerate(done) if not f]
    stopped = None
    if todo:
        stopped = _run_members([configs[i] for i in todo], [dirs[i] for i in todo],
                               [resuming[i] for i in todo])
    if stopped is not None:  # like `train.run`: {"stopped": signal, "step": n} of each member
        return [stopped] * len(configs)
    return [json.loads((d / "summary.json").read_text()) for d in dirs]


def _run_members(configs: list, dirs: list[Path], resuming: list[bool]) -> dict | None:
    """Train the unfinished members; None when they finished, else `{"stopped", "step"}`."""
    import jax

    from jaxlora import checkpoint as ckpt_lib
    from jaxlora import sharding
    from jaxlora.config import dump_config, to_dict
    from jaxlora.train import assemble, loop, runs

    cfg0 = configs[0]
    if jax.process_count() > 1:
        raise ConfigError("population: multi-host populations are not supported yet; run the "
                          "sweep with --population-size 1, or on one host's devices")
    mesh = sharding.make_mesh(cfg0.sharding)  # bad sizes fail here, before anything loads
    sharding.check_population(mesh, len(configs))
    sharding.check_batch(mesh, cfg0.data.batch_size)
    for c in configs:
        assemble.check_targets(c)
    t_start = time.perf_counter()
    with assemble.staging(mesh):
        loaded = assemble.load_base(cfg0)
        members = [Member(c.lora, c.optim, c.train.seed) for c in configs]
        check_members(loaded.base, members, loaded.config)
        state, txs = init(loaded.base, members, cfg0.train.steps)
    loaded = loaded._replace(base=jax.device_put(loaded.base, sharding.base_shardings(
        mesh, loaded.base, cfg0.quant.stacked)))
    state = jax.device_put(state, sharding.replicated(mesh, state))
    for c in configs:
        runs.check_samples(c, loaded)
    shared = all(c.data == cfg0.data for c in configs)
    first = assemble.make_datasets(cfg0, loaded)
    datasets = [first if shared or i == 0 else assemble.make_datasets(c, loaded)
                for i, c in enumerate(configs)]
    record = ckpt_lib.base_record(loaded.base, name=cfg0.model.name,
                                  quant=to_dict(cfg0)["quant"])
    for c, d, r in zip(configs, dirs, resuming, strict=True):
        if not r:
            d.mkdir(parents=True, exist_ok=True)
            runs.write_atomic(d / "config.toml", dump_config(c))
    setups = [assemble.Setup(loaded, loaded.base, c.lora, tx, s, record)
              for c, tx, s in zip(configs, txs, state.members, strict=True)]
    managers = [assemble.checkpoint_manager(c, d, s) for c, d, s in zip(configs, dirs, setups,
                                                                    strict=True)]
    state, positions, resumed = _resume(state, managers, resuming, dirs, cfg0.train.steps)
    assemble.log_line(f"jaxlora: population of {len(configs)} over {loaded.source} "
              f"({cfg0.quant.qtype}, {loaded.report.total_bytes / 2**20:.1f} MiB), "
              f"{'shared' if shared else 'own'} data; members: "
              + ", ".join(c.name for c in configs))
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(d / "metrics.jsonl", "a")) for d in dirs]
        start = int(state.members[0].step) or -1  # the resumed checkpoint's step, or none
        sinks = [stack.enter_context(loop.tensorboard(d / "tensorboard", c.train.tensorboard,
                                                      start))
                 for c, d in zip(configs, dirs, strict=True)]
        for mgr in managers:
            stack.enter_context(mgr)
        stop = stack.enter_context(loop.StopSignals())
        logs = [loop.MetricsLog(f, log_every=c.train.log_every, steps=c.train.steps,
                                lr=functools.partial(assemble.learning_rate, c), t_start=t_start,
                                window=resumed[i], sinks=sinks[i])
                for i, (c, f) in enumerate(zip(configs, files, strict=True))]
        team = [_Member(c, d, s, m, ds, lg) for c, d, s, m, ds, lg in
                zip(configs, dirs, setups, managers, datasets, logs, strict=True)]
        out = _train_members(team, state, positions, shared, stop, loaded, mesh)
    if isinstance(out, dict):
        return out
    for mem, member_state, before, after in out:
        runs.finish_run(mem.cfg, mem.setup._replace(state=member_state), mem.run_dir,
                     {"state": member_state, "before": before, "after": after,
                      "tokens_per_s": mem.log.tokens_per_s},
                     lora.summary(loaded.base, member_state.adapters), t_start,
                     len(assemble.data_notices(mem.datasets)))
    return None


def _resume(state: PopulationState, managers, resuming, dirs, steps):
    """Restore every member at the newest step all of them have; drop later metrics."""
    import jax

    from jaxlora.train import assemble, runs

    latest = [m.latest_step() if r else None for m, r in zip(managers, resuming, strict=True)]
    positions, resumed = [None] * len(managers), [{} for _ in managers]
    start = -1
    if latest and all(s is not None for s in latest):
        start = min(latest)
        restored = [m.restore(s, step=start) for m, s in zip(managers, state.members,
                                                            strict=True)]
        state = jax.device_put(state._replace(members=tuple(r.state for r in restored)),
                               jax.tree.map(lambda x: x.sharding, state))  # onto the mesh
        positions = [r.data_position for r in restored]
        resumed = [r.metrics for r in restored]
        assemble.log_line(f"jaxlora: population resumed at step {start}")
    for d in dirs:
        runs.truncate_metrics(d / "metrics.jsonl", start, final=start >= steps)
    alive = [not _diverged(d) for d in dirs]
    return state._replace(alive=jnp.asarray(alive)), positions, resumed


def _diverged(run_dir: Path) -> int | None:
    """The step a member's metrics.jsonl records it diverged at, or None."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        rec = json.loads(line)
        if rec.get("diverged"):
            return int(rec["step"])
    return None


def _evaluator(team: list[_Member], shared: bool, loaded: Any, dtype: Any, mesh: Any):
    """`val(adapters_tuple_or_None) -> [metrics of each member]` over each member's held-out
    batches (the same rows for all when the data is shared)."""
    from jaxlora.train import step as step_lib

    cfg0, k = team[0].cfg, len(team)
    pop_eval = make_eval_step(loaded.config, k, shared=shared, compute_dtype=dtype, mesh=mesh)
    base_eval = step_lib.make_eval_step(loaded.config, compute_dtype=dtype)

    def val(adapters: tuple | None) -> list[dict[str, float]]:
        if team[0].datasets.validation is None:
            return [{} for _ in team]
        if adapters is None:  # the bare base, once per distinct held-out set
            sets = [team[0]] if shared else team
            out = [step_lib.evaluate(base_eval, None, loaded.base,
                                     m.datasets.validation.eval_batches(), cfg0.eval.batches)
                   for m in sets]
            return out * k if shared else out
        sources = [team[0].datasets.validation.eval_batches()] if shared else [
            m.datasets.validation.eval_batches() for m in team]
        sums, counts = np.zeros(k), np.zeros(k)
        for i, parts in enumerate(zip(*sources, strict=False)):  # eval sets may differ in length
            if i >= cfg0.eval.batches:
                break
            rows = parts[0] if shared else next(_rows_of([iter([p]) for p in parts]))
            s, c = pop_eval(adapters, loaded.base, step_lib.device_batch(rows))
            sums, counts = sums + np.asarray(s), counts + np.asarray(c)
        memory.return_freed_memory()
        losses = sums / np.maximum(counts, 1.0)
        return [{"val_loss": float(x), "val_ppl": math.exp(min(float(x), 50.0)),
                 "val_tokens": int(c)} for x, c in zip(losses, counts, strict=True)]

    return val


def _train_members(team: list[_Member], state: PopulationState, positions: list, shared: bool,
                   stop: Any, loaded: Any, mesh: Any):
    """The population's loop: member logs, evaluations and checkpoints as hooks. Returns
    `[(member, final state, val before, val after)]`, or `{"stopped", "step"}` when a signal
    stopped it."""
    from tqdm.auto import tqdm

    from jaxlora import sharding
    from jaxlora.train import assemble, loop

    cfg0, k = team[0].cfg, len(team)
    dtype = assemble.compute_dtype(cfg0.model.compute_dtype)
    val = _evaluator(team, shared, loaded, dtype, mesh)
    iters = ([team[0].datasets.train.iterator(positions[0])] if shared else
             [m.datasets.train.iterator(p) for m, p in zip(team, positions, strict=True)])
    where = lambda i: (iters[0] if shared else iters[i]).state().as_dict()
    start = int(state.members[0].step)
    before = val(None)
    for mem, b in zip(team, before, strict=True):
        mem.log.last_val = mem.log.window_metrics().get("val_loss", b.get("val_loss"))
        if start == 0 and b:
            mem.log.emit({"step": 0, **b})
            mem.log.last_val = b["val_loss"]
    diverged = [not bool(a) for a in np.asarray(state.alive)]
    bar = tqdm(total=cfg0.train.steps, initial=start, disable=not cfg0.train.progress,
               desc=f"population of {k}", unit="step", dynamic_ncols=True, file=sys.stderr)
    saves = [loop.checkpoint_hook(m.manager, m.log, functools.partial(where, i))
             for i, m in enumerate(team)]

    def members(info) -> None:
        finite = np.asarray(info.metrics.finite)
        for i, mem in enumerate(team):
            if not diverged[i] and not finite[i]:
                diverged[i] = True
                mem.log.emit({"step": info.step, "diverged": True})
                assemble.log_line(f"jaxlora: {mem.cfg.name} diverged at step {info.step} (non-finite "
                          f"loss or gradient); frozen at its step {info.step - 1} adapters")
            if not diverged[i]:
                mem.log(_view(info, i, shared))
        if cfg0.eval.every and info.step % cfg0.eval.every == 0 and not info.final:
            for mem, v in zip(team, val(tuple(m.adapters for m in info.state.members)),
                              strict=True):
                if v:
                    mem.log.emit({"step": info.step, **v})
                    mem.log.last_val = v["val_loss"]
        for i, save in enumerate(saves):
            save(_view(info, i, shared))
        bar.update(1)

    step_fn = make_step(loaded.config, [m.setup.tx for m in team], shared_data=shared,
                        compute_dtype=dtype, remat=cfg0.model.remat,
                        dropout=any(m.cfg.lora.dropout > 0 for m in team), mesh=mesh)
    batches = iters[0] if shared else _rows_of(iters)
    placement = sharding.batch_sharding(mesh) if shared else sharding.population_rows(mesh)
    try:
        info = loop.train_loop(step_fn, state, loaded.base, batches, steps=cfg0.train.steps,
                               grad_accum=cfg0.train.grad_accum, hooks=[members], stop=stop,
                               place=functools.partial(sharding.put_batch, placement))
    except loop.NonFiniteStep as e:
        raise ConfigError(f"population: every member diverged by step {e.step + 1}") from None
    bar.close()
    state = state if info is None else info.state
    if info is not None and info.stop is not None:
        for m in team:
            m.manager.wait()
        step = int(state.members[0].step)
        assemble.log_line(f"jaxlora: {info.stop} received; population saved at step {step}; run the "
                  f"same command again to resume")
        return {"stopped": info.stop, "step": step}
    after = val(tuple(m.adapters for m in state.members))
    out = []
    for i, (mem, b, a) in enumerate(zip(team, before, after, strict=True)):
        member_state = state.members[i]
        step = int(member_state.step)
        if a:
            mem.log.emit({"step": step, **a})
        mem.manager.save(step, member_state, data_position=where(i),
                         metrics={"val_loss": a["val_loss"]} if a else {}, force=True)
        out.append((mem, member_state, b, a))
    return out


# --------------------------------------------------------------------------------------------
# How many members fit
# --------------------------------------------------------------------------------------------
def group_key(cfg: Any) -> str:
    """What runs must share to be members of one population (configs with equal keys can)."""
    from jaxlora.config import to_dict
    from jaxlora.io import RANDOM_MODELS

    random_model = cfg.model.name in RANDOM_MODELS
    flat = _flat(to_dict(cfg))
    return json.dumps({k: v for k, v in flat.items() if not _is_member_key(k, random_model)},
                      sort_keys=True, default=str)


def memory_budget() -> int:
    """Bytes a population may use: the accelerator's memory, or 90% of the host's available
    memory (MemAvailable) on CPU."""
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(0.9 * int(info["MemAvailable"].split()[0]) * 1024)


def plan_size(cfg: Any, requested: int | None = None, budget: int | None = None,
              cap: int = 16) -> int:
    """The population size for runs like `cfg`: `requested` when it fits the memory estimate
    (else a ConfigError with the estimate and the largest size that fits), or the largest
    size up to `cap` that fits. Reads the model's header only, before anything loads."""
    from jaxlora import io

    mcfg = io.model_config(cfg.model.name)
    budget = memory_budget() if budget is None else budget
    limit = max(requested or 0, cap)
    fits = max([k for k in range(1, limit + 1) if estimate_bytes(cfg, mcfg, k) <= budget],
               default=0)
    if requested is None:
        return max(fits, 1)
    if requested > fits:
        gib = lambda b: b / 2**30
        raise ConfigError(
            f"population_size: {requested} members of {cfg.model.name} need an estimated "
            f"{gib(estimate_bytes(cfg, mcfg, requested)):.1f} GiB, {gib(budget):.1f} GiB are "
            f"available; at most {fits} fit")
    return requested
