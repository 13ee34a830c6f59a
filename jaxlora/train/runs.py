"""Run directories: create or check one, train a config into it, finish it, read it back.

A run directory holds `config.toml` (the resolved config, enough to rebuild everything),
`metrics.jsonl`, `checkpoints/` (adapters and train state; the base by name and fingerprint),
`summary.json`, `loss.png` and `samples.txt`. `run` trains a config into one (resuming the
same config, refusing another); `open_run`, `evaluate_run`, `load_for_inference` and
`describe` read one back, so `eval`, `export`, `generate` and `info` need nothing else.
The pieces a config determines (base, data, adapters, state) come from `train.assemble`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils

from jaxlora import lora, memory, optim, plan, quant, sharding
from jaxlora.config import Config, ModelSection, dump_config, load_config
from jaxlora.errors import CheckpointError, ConfigError
from jaxlora.train import loop
from jaxlora.train.assemble import (
    Loaded,
    Setup,
    check_targets,
    checkpoint_manager,
    compute_dtype,
    data_notices,
    describe_mesh,
    learning_rate,
    load_base,
    log_line,
    make_datasets,
    setup,
)
from jaxlora.train.step import NonFiniteError, evaluate, make_eval_step, make_train_step

__all__ = [
    "OpenRun",
    "same_run",
    "check_run_dir",
    "write_atomic",
    "truncate_metrics",
    "finish_run",
    "run",
    "open_run",
    "evaluate_run",
    "load_for_inference",
    "describe",
]

Params = lora.Params
Adapters = lora.Adapters


class OpenRun(NamedTuple):
    """A run directory read back: its config, base, adapters of one checkpoint and step."""

    config: Config
    loaded: Loaded
    base: Params
    adapters: Adapters
    spec: lora.LoraSpec
    step: int



# --------------------------------------------------------------------------------------------
# Reading a run directory back
# --------------------------------------------------------------------------------------------
def _read_config(run_dir: Path) -> Config:
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.toml)")
    return load_config(run_dir / "config.toml")


def open_run(run_dir: str | os.PathLike, step: int | str = "latest") -> OpenRun:
    """The base and the checkpointed adapters of a run directory.

    `step`: "latest", "best" (lowest validation loss; the latest when no step has one) or a
    step number.
    """
    run_dir = Path(run_dir)
    cfg = _read_config(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir}: the run has no checkpoints yet (no checkpoints/)")
    s = setup(cfg)
    mgr = checkpoint_manager(cfg, run_dir, s, read_only=True)
    which = step
    if step == "best":
        which = mgr.best_step()
    which = None if which in ("latest", None) else int(which)
    restored = mgr.restore(s.state, step=which, base=s.base)
    return OpenRun(cfg, s.loaded, s.base, restored.state.adapters, s.spec, restored.step)


def load_for_inference(model: str, adapter: str | None = None, *, qtype: str = "none"
                       ) -> tuple[Loaded, Adapters | None]:
    """A base model (quantized on load unless qtype is "none") and optional adapters.

    `adapter` is a run directory (its own base is used) or a PEFT adapter folder.
    """
    if adapter is not None and (Path(adapter) / "config.toml").is_file():
        opened = open_run(adapter)
        return opened.loaded._replace(base=opened.base), opened.adapters
    loaded = load_base(Config(model=ModelSection(name=model), quant=quant.QuantRules(qtype=qtype)))
    if adapter is None:
        return loaded, None
    from jaxlora.io import peft

    return loaded, peft.load_peft(adapter, loaded.base, loaded.config.arch)


def evaluate_run(run_dir: str | os.PathLike, max_batches: int | None = None) -> dict[str, Any]:
    """Held-out loss and perplexity of a run's latest adapters and of its bare base."""
    opened = open_run(run_dir)
    cfg = opened.config
    val = make_datasets(cfg, opened.loaded).validation
    if val is None:
        raise ConfigError(f"{run_dir}: the run's config has no validation data")
    n = max_batches or cfg.eval.batches
    ev = make_eval_step(opened.loaded.config, compute_dtype=compute_dtype(cfg.model.compute_dtype))
    return {
        "step": opened.step,
        "base": evaluate(ev, None, opened.base, val.eval_batches(), n),
        "adapted": evaluate(ev, opened.adapters, opened.base, val.eval_batches(), n),
    }


def describe(target: str, *, qtype: str = "nf4") -> str:
    """A text summary of a run directory or of a model (architecture, sizes, quantization)."""
    path = Path(target)
    if (path / "config.toml").is_file():
        opened = open_run(path)
        summ = lora.summary(opened.base, opened.adapters)
        cfg = opened.config
        opt_state = jax.eval_shape(optim.make_optimizer(cfg.optim, cfg.train.steps).init,
                                   opened.adapters)
        try:
            mesh = describe_mesh(sharding.make_mesh(cfg.sharding), opened.base, opened.adapters,
                                  opt_state, cfg.quant.stacked)
        except ConfigError as e:  # the run's mesh does not fit this machine
            mesh = str(e)
        lines = [f"run {path} (step {opened.step})", f"model: {opened.loaded.source}",
                 f"adapters: {summ}", mesh]
        if (path / "summary.json").is_file():
            s = json.loads((path / "summary.json").read_text())
            lines += [f"{k}: {v}" for k, v in s.items() if not isinstance(v, list | dict)]
        return "\n".join(lines)
    loaded = load_base(Config(model=ModelSection(name=target), quant=quant.QuantRules(qtype=qtype)))
    c, r = loaded.config, loaded.report
    mib = 2**20
    return "\n".join([
        f"model: {loaded.source}",
        f"architecture: {c.arch} ({c.name}), {c.num_layers} layers, d={c.hidden_size}, heads "
        f"{c.num_heads}/{c.num_kv_heads} (q/kv), head_dim {c.head_dim}, mlp "
        f"{c.intermediate_size}, vocab {c.vocab_size}, tied={c.tie_embeddings}",
        f"parameters: {r.total_params:,} ({r.quantized_params:,} quantized as {qtype}, "
        f"{r.float_params:,} float)",
        f"bytes: {r.total_bytes / mib:.1f} MiB ({r.quantized_bytes / mib:.1f} MiB quantized, "
        f"{r.float_bytes / mib:.1f} MiB float), "
        f"{8 * r.total_bytes / max(r.total_params, 1):.3f} bits/param",
    ])


# --------------------------------------------------------------------------------------------
# Creating, checking and training a run directory
# --------------------------------------------------------------------------------------------
_TMP = ".tmp"  # suffix of the temporary files `write_atomic` renames into place


def write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all. The temporary file has a fixed name, so what a kill
    leaves of it is overwritten by the next write and is never taken for user files."""
    tmp = path.with_name(f".{path.name}{_TMP}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_temporary(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(_TMP)


def same_run(a: Config, b: Config) -> bool:
    """Equal up to settings that do not change what a run computes: the progress bar, the
    device mesh and the quantized matmul path ``quant.kernel`` (a run may resume on another
    machine; its checkpoints restore onto any mesh)."""
    def norm(c: Config) -> Config:
        return dataclasses.replace(c, train=dataclasses.replace(c.train, progress=True),
                                   sharding=sharding.ShardingSpec(),
                                   quant=dataclasses.replace(c.quant, kernel="auto"))

    return norm(a) == norm(b)


def check_run_dir(cfg: Config, run_dir: Path) -> bool:
    """True when `run_dir` holds this same run (resume); refuse a directory of anything else.

    Reads only: the directory is created once the model and the data have loaded, so a run
    that fails on bad input leaves nothing behind.
    """
    saved = run_dir / "config.toml"
    if saved.exists():
        if not same_run(load_config(saved), cfg):
            raise ConfigError(
                f"{run_dir}: holds a different run (its config.toml differs); choose another "
                f"name (--set name=...) or output_dir instead of overwriting it"
            )
        return True
    if run_dir.exists() and not run_dir.is_dir():  # an OS error: the CLI exits 1
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(run_dir))
    if run_dir.exists() and any(not _is_temporary(p) for p in run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: exists and is not a jaxlora run directory; not touching it")
    return False


def truncate_metrics(path: Path, step: int, final: bool) -> None:
    """Keep the records of metrics.jsonl that the checkpoint of `step` accounts for.

    Records after `step` (a fallback past a damaged checkpoint, or a kill between a log line
    and the next save) and a line cut short are dropped: the resumed run writes them again.
    `final` (the step is the last one): its validation record is dropped too, since the run
    evaluates the final adapters again (a kill after the final save, before summary.json).
    `step` -1: no checkpoint, every record goes.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        s = rec.get("step", 0)
        if s < step or (s == step and not (final and "val_loss" in rec)):
            keep.append(line)
    if keep != lines:
        write_atomic(path, "".join(x + "\n" for x in keep))


def run(cfg: Config, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one experiment into `run_dir` (default `output_dir/name`) and return its summary
    (on processes other than 0 of a multi-host run: its name, steps and process index).

    Writes `config.toml` (the resolved config), `metrics.jsonl`, `checkpoints/`,
    `summary.json`, `loss.png` and `samples.txt`. A run directory that already holds the
    same config is resumed from its latest checkpoint; one holding another config is refused.
    Multi-host (`jaxlora.sharding.distributed`): every process runs this; only process 0
    writes the files other than checkpoints, which all processes write together.
    """
    sharding.initialize(cfg.sharding)  # before any device is touched
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    resuming = check_run_dir(cfg, run_dir)
    if resuming and (run_dir / "summary.json").exists():
        log_line(f"jaxlora: {run_dir} is already finished; summary.json left as it is")
        return json.loads((run_dir / "summary.json").read_text())
    t_start = time.perf_counter()
    mesh = sharding.make_mesh(cfg.sharding)  # bad sizes fail here, before anything loads
    sharding.check_population(mesh, None)
    sharding.check_batch(mesh, cfg.data.batch_size)
    check_targets(cfg)
    for line in plan.format_plan(plan.plan(cfg), cfg.model.remat).splitlines():  # nothing loaded
        log_line(f"jaxlora: {line}")
    s = setup(cfg, mesh)
    check_samples(cfg, s.loaded)
    datasets = make_datasets(cfg, s.loaded)
    primary = sharding.is_primary()
    if jax.process_count() > 1:  # every host has checked the directory before one writes
        multihost_utils.sync_global_devices("jaxlora: run directory checked")
    if not resuming and primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.toml", dump_config(cfg))
    summ = lora.summary(s.base, s.state.adapters)
    log_line(f"jaxlora: model {s.loaded.source} ({s.loaded.config.name}), base "
         f"{s.loaded.report.total_bytes / 2**20:.1f} MiB ({cfg.quant.qtype}); {summ}")
    state = s.state
    log_line(f"jaxlora: "
         f"{describe_mesh(mesh, s.base, state.adapters, state.opt_state, cfg.quant.stacked)}")
    manager = checkpoint_manager(cfg, run_dir, s)
    state, position, resumed, start = s.state, None, {}, -1
    if resuming and cfg.checkpoint.resume and manager.latest_step() is not None:
        restored = manager.restore(s.state)
        state = jax.device_put(restored.state, s.shardings.state)  # onto this run's mesh
        position, resumed, start = restored.data_position, restored.metrics, restored.step
        log_line(f"jaxlora: resumed {run_dir} at step {restored.step}")
    if primary:
        truncate_metrics(run_dir / "metrics.jsonl", start, final=start >= cfg.train.steps)
    metrics = run_dir / "metrics.jsonl" if primary else os.devnull  # one writer
    tensorboard = loop.tensorboard(run_dir / "tensorboard", cfg.train.tensorboard and primary,
                                   start)
    with open(metrics, "a") as mf, tensorboard as sinks, loop.StopSignals() as stop, manager:
        out = _train(cfg, s, datasets, manager, state, position, resumed, (mf, sinks), stop,
                     t_start)
    if "stopped" in out:
        return out
    return finish_run(cfg, s, run_dir, out, summ, t_start, len(data_notices(datasets)))


def _train(cfg: Config, s: Setup, datasets, manager, state, position, resumed, outputs, stop,
           t_start) -> dict[str, Any]:
    """The loop of `run` with its hooks: logs (`outputs`: the metrics.jsonl file and the other
    sinks of its records), evaluations, checkpoints, stop signals."""
    mf, sinks = outputs
    from tqdm.auto import tqdm

    dtype = compute_dtype(cfg.model.compute_dtype)
    eval_fn = make_eval_step(s.loaded.config, compute_dtype=dtype)
    mesh = s.shardings.batch.mesh
    eval_place = functools.partial(sharding.put_batch, sharding.batch_sharding(mesh, accum=False))

    def val_metrics(adapters_or_none) -> dict[str, float]:
        if datasets.validation is None:
            return {}
        out = evaluate(eval_fn, adapters_or_none, s.base, datasets.validation.eval_batches(),
                       cfg.eval.batches, place=eval_place)
        memory.return_freed_memory()  # the eval buffers, before the train step's land beside them
        return out

    start = int(state.step)
    train_iter = datasets.train.iterator(position)
    bar = tqdm(total=cfg.train.steps, initial=start,
               disable=not (cfg.train.progress and sharding.is_primary()),
               desc=cfg.name, unit="step", dynamic_ncols=True, file=sys.stderr)
    log = loop.MetricsLog(mf, log_every=cfg.train.log_every, steps=cfg.train.steps,
                          lr=lambda step: learning_rate(cfg, step), t_start=t_start, progress=bar,
                          window=resumed, sinks=sinks)
    # the held-out loss of the model the run starts from (summary: val_loss_before): the base,
    # except that PiSSA's and LoftQ's base is that model only with its initial adapters
    before = val_metrics(s.state.adapters if cfg.lora.init in ("pissa", "loftq") else None)
    if start == 0 and before:
        log.emit({"step": 0, **before})
        log_line(f"jaxlora: held-out loss before training {before['val_loss']:.4f} "
             f"(ppl {before['val_ppl']:.2f})")
    log.last_val = resumed.get("val_loss", before.get("val_loss"))
    position_now = lambda: train_iter.state().as_dict()
    step_fn = make_train_step(s.loaded.config, s.tx, compute_dtype=dtype, remat=cfg.model.remat,
                              dropout=s.spec.dropout > 0, shardings=s.shardings)
    hooks = [log, loop.eval_hook(log, val_metrics, cfg.eval.every),
             loop.checkpoint_hook(manager, log, position_now)]
    try:
        info = loop.train_loop(step_fn, state, s.base, train_iter, steps=cfg.train.steps,
                               grad_accum=cfg.train.grad_accum, hooks=hooks, stop=stop,
                               place=functools.partial(sharding.put_batch, s.shardings.batch))
    except loop.NonFiniteStep as e:
        manager.save(e.step, e.state, data_position=position_now(), metrics={}, force=True)
        raise NonFiniteError(
            f"step {e.step + 1}: non-finite loss or gradient (loss={float(e.metrics.loss)}, "
            f"grad_norm={float(e.metrics.grad_norm)}); stopped, last good adapters saved at "
            f"step {e.step} in {manager.directory}"
        ) from None
    bar.close()
    state = state if info is None else info.state
    step = int(state.step)
    if info is not None and info.stop is not None:
        manager.wait()
        log_line(f"jaxlora: {info.stop} received; saved step {step} in {manager.directory}; "
             f"run the same command again to resume")
        return {"stopped": info.stop, "step": step}
    after = val_metrics(state.adapters)
    if after:
        log.emit({"step": step, **after})
    manager.save(step, state, data_position=position_now(),
                 metrics={"val_loss": after["val_loss"]} if after else {}, force=True)
    return {"state": state, "before": before, "after": after, "tokens_per_s": log.tokens_per_s}


def finish_run(cfg: Config, s: Setup, run_dir: Path, out: dict[str, Any], summ, t_start,
            skipped_files: int) -> dict[str, Any]:
    """Samples, loss.png, samples.txt and (last: it marks the run finished) summary.json.

    `skipped_files`: the data files skipped with a notice (counted in summary.json)."""
    memory.return_freed_memory()  # the step's buffers, before the generation programs compile
    state = out["state"]
    samples = _samples(cfg, s.loaded, s.base, state.adapters)  # on every process (SPMD)
    if not sharding.is_primary():
        return {"name": cfg.name, "steps": int(state.step), "process": jax.process_index()}
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    train_losses = [r["loss"] for r in records if "loss" in r]
    summary = {
        "name": cfg.name,
        "model": s.loaded.source,
        "qtype": cfg.quant.qtype,
        "steps": int(state.step),
        "train_loss": train_losses[-1] if train_losses else None,
        "val_loss_before": out["before"].get("val_loss"),
        "val_loss": out["after"].get("val_loss"),
        "val_ppl": out["after"].get("val_ppl"),
        "tokens_per_s": out["tokens_per_s"],
        "peak_rss_mb": memory.peak_rss_mb(),
        "base_bytes": s.loaded.report.total_bytes,
        "adapter_params": summ.trainable,
        "adapter_bytes": summ.adapter_bytes,
        "wall_s": time.perf_counter() - t_start,
        "skipped_files": skipped_files,
        "samples": samples,
    }
    _plot_loss(records, run_dir / "loss.png", cfg.name)
    write_atomic(run_dir / "samples.txt", _samples_text(samples))
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))  # last: "finished"
    return summary


def _samples(cfg: Config, loaded: Loaded, base: Params, adapters: Adapters
             ) -> list[dict[str, str]]:
    """Greedy completions of the configured prompts, without and with the adapters."""
    if not cfg.eval.samples:
        return []
    from jaxlora import generate

    prompts = list(cfg.eval.samples)
    kw = dict(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
              chat=cfg.eval.chat)
    before = generate.generate(loaded.config, base, loaded.tokenizer, prompts, **kw)
    after = generate.generate(loaded.config, base, loaded.tokenizer, prompts, adapters=adapters,
                              **kw)
    return [{"prompt": p, "base": b, "adapted": a}
            for p, b, a in zip(prompts, before, after, strict=True)]


def check_samples(cfg: Config, loaded: Loaded) -> None:
    """Refuse chat-formatted samples for a tokenizer without a chat template (before training,
    not after it)."""
    if cfg.eval.samples and cfg.eval.chat and loaded.tokenizer.chat_template is None:
        raise ConfigError(f"eval.chat: {loaded.source} has no chat template; set eval.chat = "
                          "false to continue the sample prompts as plain text")


def _samples_text(samples: list[dict[str, str]]) -> str:
    return "\n".join(f"### prompt\n{s['prompt']}\n\n### base model\n{s['base']}\n\n"
                     f"### with adapters\n{s['adapted']}\n" for s in samples)


def _plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}{_TMP}")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
