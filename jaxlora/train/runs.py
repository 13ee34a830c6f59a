"""Run directories: build a run from its config, create or check its folder, train it, open it.

A run directory holds `config.toml` (the resolved config, enough to rebuild everything),
`metrics.jsonl`, `checkpoints/` (adapters and train state; the base by name and fingerprint),
`summary.json`, `loss.png` and `samples.txt`. `run` trains a config into one (resuming the
same config, refusing another); `open_run`, `evaluate_run`, `load_for_inference` and
`describe` read one back, so `eval`, `export`, `generate` and `info` need nothing else.
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
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils

from jaxlora import data as data_lib
from jaxlora import lora, memory, models, optim, quant, sharding
from jaxlora.config import Config, ModelSection, dump_config, load_config, to_dict
from jaxlora.errors import CheckpointError, ConfigError
from jaxlora.train import loop
from jaxlora.train.step import (
    NonFiniteError,
    TrainState,
    evaluate,
    init_state,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "Loaded",
    "Setup",
    "OpenRun",
    "DTYPES",
    "compute_dtype",
    "load_base",
    "make_datasets",
    "setup",
    "data_notices",
    "checkpoint_manager",
    "same_run",
    "run",
    "open_run",
    "evaluate_run",
    "load_for_inference",
    "describe",
]

Params = lora.Params
Adapters = lora.Adapters

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str) -> Any:
    """The activation dtype of `model.compute_dtype`: "auto" is bfloat16 on GPU and TPU (the
    matrix units' native type) and float32 on CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return DTYPES[name]


class Loaded(NamedTuple):
    """The frozen model a run trains on."""

    config: models.ModelConfig
    base: Params
    tokenizer: Any
    source: str
    report: quant.QuantReport


class Setup(NamedTuple):
    """Everything a config determines before training: deterministic in its seeds."""

    loaded: Loaded
    base: Params  # the loaded base, or PiSSA's residual
    spec: lora.LoraSpec
    tx: optax.GradientTransformation
    state: TrainState  # freshly initialized (also the template a checkpoint restores into)
    base_record: dict[str, Any]
    shardings: Any = None  # `sharding.StepShardings` when placed on a mesh, else None


class OpenRun(NamedTuple):
    """A run directory read back: its config, base, adapters of one checkpoint and step."""

    config: Config
    loaded: Loaded
    base: Params
    adapters: Adapters
    spec: lora.LoraSpec
    step: int


# --------------------------------------------------------------------------------------------
# From the config to the pieces of a run
# --------------------------------------------------------------------------------------------
def load_base(cfg: Config) -> Loaded:
    """Load the base and quantize it (`tiny-*` names: random weights from the train seed).

    Checkpoints are quantized tensor by tensor while they are read, so the float model never
    exists whole in host memory.
    """
    from jaxlora import io

    rules = cfg.quant
    loaded = io.load_model(cfg.model.name, quant=None if rules.qtype == "none" else rules,
                           dtype=DTYPES[cfg.model.param_dtype], seed=cfg.train.seed)
    return Loaded(loaded.config, loaded.params, loaded.tokenizer, loaded.source,
                  quant.report(loaded.params))


def _lr(cfg: Config, step: int) -> float:
    return float(optim.make_schedule(
        lr=cfg.optim.lr, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
        total_steps=cfg.train.steps, min_lr_ratio=cfg.optim.min_lr_ratio)(step))


def make_datasets(cfg: Config, loaded: Loaded) -> data_lib.Datasets:
    """The training and validation data of the config, tokenized by the run's model: this
    process's share of it (its own documents, batch_size / processes rows per batch).

    Prints one ``jaxlora:`` line per skipped file (path, line, reason; see `data_notices`).
    """
    datasets = data_lib.load_datasets(cfg.data, loaded.tokenizer,
                                      max_positions=loaded.config.max_position_embeddings,
                                      shard=(jax.process_index(), jax.process_count()))
    for notice in data_notices(datasets):
        _log(f"jaxlora: {notice}")
    return datasets


def data_notices(datasets: data_lib.Datasets) -> list[str]:
    """The skip notices of both splits, each once (a held-out fraction shares the scan)."""
    splits = [d for d in datasets if d is not None]
    return list(dict.fromkeys(n for d in splits for n in d.stats.notices))


def setup(cfg: Config, mesh: Any = None) -> Setup:
    """Base, adapters, optimizer and initial state of a config (deterministic in the seeds).

    With a `mesh` (`jaxlora.sharding.make_mesh`), the base and the state are placed on it by
    the partition rules of `jaxlora.sharding`; without one they stay on the default device.
    """
    from jaxlora import checkpoint as ckpt_lib

    loaded = load_base(cfg)
    spec = cfg.lora
    base = loaded.base
    if spec.init == "pissa":
        base, adapters = lora.init_pissa(base, spec)
    else:
        adapters = lora.init(jax.random.key(cfg.train.seed), base, spec)
    tx = optim.make_optimizer(cfg.optim, total_steps=cfg.train.steps)
    state = init_state(adapters, tx, cfg.train.seed)
    # base.json records the [quant] table as the config file writes it
    record = ckpt_lib.base_record(base, name=cfg.model.name, quant=to_dict(cfg)["quant"])
    shardings = None
    if mesh is not None:
        shardings = sharding.step_shardings(mesh, state, base, cfg.quant.stacked)
        placed = jax.device_put(base, shardings.base)
        state = jax.device_put(state, shardings.state)
        if base is loaded.base:  # keep one copy of the base, the placed one
            loaded = loaded._replace(base=placed)
        base = placed
    return Setup(loaded, base, spec, tx, state, record, shardings)


def checkpoint_manager(cfg: Config, run_dir: str | os.PathLike, setup: Setup, *,
                       read_only: bool = False):
    """The `CheckpointManager` of a run directory, checking the base against `setup`'s.

    `read_only`: for commands that only read the run (eval, info, export, generate); such a
    manager writes nothing into the directory.
    """
    from jaxlora import checkpoint as ckpt_lib

    return ckpt_lib.CheckpointManager(
        Path(run_dir), save_every=cfg.checkpoint.every or cfg.train.steps,
        keep=cfg.checkpoint.keep, keep_best=1 if cfg.checkpoint.keep_best else 0,
        async_save=cfg.checkpoint.async_save, base=setup.base_record, read_only=read_only,
    )


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
            mesh = _describe_mesh(sharding.make_mesh(cfg.sharding), opened.base, opened.adapters,
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
_TMP = ".tmp"  # suffix of the temporary files `_write_atomic` renames into place


def _write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all. The temporary file has a fixed name, so what a kill
    leaves of it is overwritten by the next write and is never taken for user files."""
    tmp = path.with_name(f".{path.name}{_TMP}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_temporary(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(_TMP)


def same_run(a: Config, b: Config) -> bool:
    """Equal up to settings that do not change what a run computes: the progress bar, and the
    device mesh (a run may resume on another machine; its checkpoints restore onto any mesh)."""
    def norm(c: Config) -> Config:
        return dataclasses.replace(c, train=dataclasses.replace(c.train, progress=True),
                                   sharding=sharding.ShardingSpec())

    return norm(a) == norm(b)


def _check_run_dir(cfg: Config, run_dir: Path) -> bool:
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


def _truncate_metrics(path: Path, step: int, final: bool) -> None:
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
        _write_atomic(path, "".join(x + "\n" for x in keep))


def _describe_mesh(mesh: Any, base: Params, adapters: Adapters, opt_state: Any,
                   stacked: str) -> str:
    """The mesh, and the bytes of base, adapters and optimizer state that one device holds
    there (from shapes and the partition rules: nothing needs to be placed)."""
    sh = sharding.step_shardings(mesh, (adapters, opt_state), base, stacked)
    mib = lambda tree, shardings: sharding.device_bytes(tree, shardings) / 2**20
    axes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
    return (f"mesh {axes} ({mesh.size} {mesh.devices.flat[0].platform} device(s), "
            f"{jax.process_count()} process(es)); per device: base "
            f"{mib(base, sh.base):.1f} MiB, adapters {mib(adapters, sh.state[0]):.2f} MiB, "
            f"optimizer state {mib(opt_state, sh.state[1]):.2f} MiB")


def _log(msg: str) -> None:
    """A log line on stderr, from process 0 only."""
    if sharding.is_primary():
        print(msg, file=sys.stderr, flush=True)


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
    resuming = _check_run_dir(cfg, run_dir)
    if resuming and (run_dir / "summary.json").exists():
        _log(f"jaxlora: {run_dir} is already finished; summary.json left as it is")
        return json.loads((run_dir / "summary.json").read_text())
    t_start = time.perf_counter()
    mesh = sharding.make_mesh(cfg.sharding)  # bad sizes fail here, before anything loads
    sharding.check_batch(mesh, cfg.data.batch_size)
    s = setup(cfg, mesh)
    datasets = make_datasets(cfg, s.loaded)
    primary = sharding.is_primary()
    if jax.process_count() > 1:  # every host has checked the directory before one writes
        multihost_utils.sync_global_devices("jaxlora: run directory checked")
    if not resuming and primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(run_dir / "config.toml", dump_config(cfg))
    summ = lora.summary(s.base, s.state.adapters)
    _log(f"jaxlora: model {s.loaded.source} ({s.loaded.config.name}), base "
         f"{s.loaded.report.total_bytes / 2**20:.1f} MiB ({cfg.quant.qtype}); {summ}")
    state = s.state
    _log(f"jaxlora: "
         f"{_describe_mesh(mesh, s.base, state.adapters, state.opt_state, cfg.quant.stacked)}")
    manager = checkpoint_manager(cfg, run_dir, s)
    state, position, resumed, start = s.state, None, {}, -1
    if resuming and cfg.checkpoint.resume and manager.latest_step() is not None:
        restored = manager.restore(s.state)
        state = jax.device_put(restored.state, s.shardings.state)  # onto this run's mesh
        position, resumed, start = restored.data_position, restored.metrics, restored.step
        _log(f"jaxlora: resumed {run_dir} at step {restored.step}")
    if primary:
        _truncate_metrics(run_dir / "metrics.jsonl", start, final=start >= cfg.train.steps)
    metrics = run_dir / "metrics.jsonl" if primary else os.devnull  # one writer
    with open(metrics, "a") as mf, loop.StopSignals() as stop, manager:
        out = _train(cfg, s, datasets, manager, state, position, resumed, mf, stop, t_start)
    if "stopped" in out:
        return out
    return _finish(cfg, s, run_dir, out, summ, t_start, len(data_notices(datasets)))


def _train(cfg: Config, s: Setup, datasets, manager, state, position, resumed, mf, stop,
           t_start) -> dict[str, Any]:
    """The loop of `run` with its hooks: logs, evaluations, checkpoints, stop signals."""
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
                          lr=lambda step: _lr(cfg, step), t_start=t_start, progress=bar,
                          window=resumed)
    before = val_metrics(None)  # the base's held-out loss (summary: val_loss_before)
    if start == 0 and before:
        log.emit({"step": 0, **before})
        _log(f"jaxlora: held-out loss before training {before['val_loss']:.4f} "
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
        _log(f"jaxlora: {info.stop} received; saved step {step} in {manager.directory}; "
             f"run the same command again to resume")
        return {"stopped": info.stop, "step": step}
    after = val_metrics(state.adapters)
    if after:
        log.emit({"step": step, **after})
    manager.save(step, state, data_position=position_now(),
                 metrics={"val_loss": after["val_loss"]} if after else {}, force=True)
    return {"state": state, "before": before, "after": after, "tokens_per_s": log.tokens_per_s}


def _finish(cfg: Config, s: Setup, run_dir: Path, out: dict[str, Any], summ, t_start,
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
    _write_atomic(run_dir / "samples.txt", _samples_text(samples))
    _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))  # last: "finished"
    return summary


def _samples(cfg: Config, loaded: Loaded, base: Params, adapters: Adapters
             ) -> list[dict[str, str]]:
    """Greedy completions of the configured prompts, without and with the adapters."""
    if not cfg.eval.samples:
        return []
    from jaxlora import generate

    prompts = list(cfg.eval.samples)
    kw = dict(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
              chat=loaded.tokenizer.chat_template is not None)
    before = generate.generate(loaded.config, base, loaded.tokenizer, prompts, **kw)
    after = generate.generate(loaded.config, base, loaded.tokenizer, prompts, adapters=adapters,
                              **kw)
    return [{"prompt": p, "base": b, "adapted": a}
            for p, b, a in zip(prompts, before, after, strict=True)]


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
