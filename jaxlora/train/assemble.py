"""From a config to the pieces of a run: the base, the data, adapters, optimizer, state.

`setup(cfg, mesh)` is deterministic in the config's seeds: a run, its resumption and every
command that reads a run directory back (`eval`, `export`, `generate`, `info`) rebuild the
same base and the same initial state from `config.toml`, and check the base against the
checkpoint's record of it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlora import data as data_lib
from jaxlora import lora, models, optim, quant, sharding
from jaxlora.config import Config, to_dict
from jaxlora.paths import unflatten_paths
from jaxlora.train.step import TrainState, init_state

__all__ = [
    "Loaded",
    "Setup",
    "DTYPES",
    "compute_dtype",
    "load_base",
    "check_targets",
    "make_datasets",
    "data_notices",
    "staging",
    "setup",
    "checkpoint_manager",
    "learning_rate",
    "describe_mesh",
    "log_line",
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
    base: Params  # the loaded base (LoftQ's Q at its targets), or PiSSA's residual
    spec: lora.LoraSpec
    tx: optax.GradientTransformation
    state: TrainState  # freshly initialized (also the template a checkpoint restores into)
    base_record: dict[str, Any]
    shardings: Any = None  # `sharding.StepShardings` when placed on a mesh, else None



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


def check_targets(cfg: Config) -> None:
    """Check the config's adapters against the model's shapes, from its header alone (before
    anything loads): every target exists, no rank exceeds its layer and the method suits
    every target (ConfigError)."""
    from jaxlora import io
    from jaxlora.errors import ConfigError
    from jaxlora.lora.adapters import check_method

    shapes = models.param_shapes(io.model_config(cfg.model.name))
    tree = unflatten_paths({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})
    try:
        lora.check_ranks(tree, cfg.lora)
        check_method(cfg.lora, lora.resolve_targets(tree, cfg.lora))
    except ValueError as e:
        raise ConfigError(f"{cfg.name}: {e}") from None


def _load_loftq(cfg: Config) -> tuple[Loaded, Adapters]:
    """`load_base` with LoftQ applied to the LoRA targets while they load (`lora.load_loftq`)."""
    loaded, adapters = lora.load_loftq(cfg.model.name, cfg.quant, cfg.lora,
                                       dtype=DTYPES[cfg.model.param_dtype], seed=cfg.train.seed)
    return Loaded(loaded.config, loaded.params, loaded.tokenizer, loaded.source,
                  quant.report(loaded.params)), adapters


def learning_rate(cfg: Config, step: int) -> float:
    """The learning rate of the config's schedule after `step` steps (for the logs)."""
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
                                      shard=(jax.process_index(), jax.process_count()),
                                      gather=sharding.gather_hosts)
    for notice in data_notices(datasets):
        log_line(f"jaxlora: {notice}")
    return datasets


def data_notices(datasets: data_lib.Datasets) -> list[str]:
    """The skip notices of both splits, each once (a held-out fraction shares the scan)."""
    splits = [d for d in datasets if d is not None]
    return list(dict.fromkeys(n for d in splits for n in d.stats.notices))


def staging(mesh: Any) -> contextlib.AbstractContextManager:
    """Where a base meant for `mesh` is built: the CPU device when the mesh is an accelerator's
    (and JAX has a CPU backend), else the default device."""
    if mesh is None or mesh.devices.flat[0].platform == "cpu":
        return contextlib.nullcontext()
    try:
        return jax.default_device(jax.devices("cpu")[0])
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return contextlib.nullcontext()


def setup(cfg: Config, mesh: Any = None) -> Setup:
    """Base, adapters, optimizer and initial state of a config (deterministic in the seeds).

    With a `mesh` (`jaxlora.sharding.make_mesh`), the base and the state are built in host
    memory (on an accelerator mesh: the CPU device, so no accelerator ever holds the whole
    base) and placed on the mesh by the partition rules of `jaxlora.sharding`; without one
    they stay on the default device.
    """
    from jaxlora import checkpoint as ckpt_lib

    with staging(mesh):
        spec = cfg.lora
        if spec.init == "loftq":  # the base and the adapters are chosen together, on load
            loaded, adapters = _load_loftq(cfg)
        else:
            loaded = load_base(cfg)
        base = loaded.base
        if spec.init == "pissa":
            base, adapters = lora.init_pissa(base, spec)
        elif spec.init != "loftq":
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


def describe_mesh(mesh: Any, base: Params, adapters: Adapters, opt_state: Any,
                   stacked: str) -> str:
    """The mesh, and the bytes of base, adapters and optimizer state that one device holds
    there (from shapes and the partition rules: nothing needs to be placed)."""
    sh = sharding.step_shardings(mesh, (adapters, opt_state), base, stacked)
    mib = lambda tree, shardings: sharding.device_bytes(tree, shardings) / 2**20
    axes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items() if a != "members" or n > 1)
    return (f"mesh {axes} ({mesh.size} {mesh.devices.flat[0].platform} device(s), "
            f"{jax.process_count()} process(es)); per device: base "
            f"{mib(base, sh.base):.1f} MiB, adapters {mib(adapters, sh.state[0]):.2f} MiB, "
            f"optimizer state {mib(opt_state, sh.state[1]):.2f} MiB")


def log_line(msg: str) -> None:
    """One `jaxlora:` line on stderr, from process 0 only."""
    if sharding.is_primary():
        print(msg, file=sys.stderr, flush=True)


