"""QLoRA / LoRA training: the pure jitted step and the loop that runs one experiment.

The frozen base (float or `QTensor` leaves) is an argument of the step, never part of the
trained state: `jax.grad` is taken with respect to the adapters alone and the optax
transformation from `jaxlora.optim` only ever sees the adapter tree, so the base carries no
gradient and no optimizer state (Dettmers et al. 2023, "QLoRA", arXiv 2305.14314).

The loss is the masked next-token cross-entropy in float32. The vocabulary projection is
computed in chunks of tokens under `jax.checkpoint`, so the `[tokens, vocab]` logits never
exist whole (49k-entry vocabularies dominate a small model's activation memory otherwise).
Gradient accumulation sums per-token losses and gradients over micro-batches and divides by
the total number of trained tokens once, so it equals the full batch exactly (up to float
summation order).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora import data as data_lib
from jaxlora import lora, memory, models, optim, quant
from jaxlora.config import Config, dump_config, load_config
from jaxlora.errors import CheckpointError, ConfigError, JaxloraError

__all__ = [
    "TrainState",
    "StepMetrics",
    "Loaded",
    "NonFiniteError",
    "load_base",
    "make_lora_spec",
    "init_state",
    "loss_and_count",
    "make_train_step",
    "compile_step",
    "make_eval_step",
    "evaluate",
    "run",
    "open_run",
    "evaluate_run",
    "load_for_inference",
    "describe",
]

Array = jax.Array
Params = lora.Params
Adapters = lora.Adapters

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteError(JaxloraError):
    """The loss or the gradients became NaN/Inf; the last good adapters were kept."""


class TrainState(NamedTuple):
    """Everything that changes during training (the base is passed beside it)."""

    step: Array  # int32 scalar
    adapters: Adapters
    opt_state: optax.OptState
    rng: Array  # raw uint32 key data [2]; folded with the step for dropout


class StepMetrics(NamedTuple):
    loss: Array  # mean loss over the trained tokens of the step
    tokens: Array  # trained (loss-masked) tokens in the step
    grad_norm: Array
    finite: Array  # bool: loss and gradients finite (the update was applied)


class Loaded(NamedTuple):
    """The frozen model a run trains on."""

    config: models.ModelConfig
    base: Params
    tokenizer: Any
    source: str
    report: quant.QuantReport


# --------------------------------------------------------------------------------------------
# Model and adapters from the config
# --------------------------------------------------------------------------------------------
def _quant_rules(cfg: Config) -> quant.QuantRules:
    return quant.QuantRules(**dataclasses.asdict(cfg.quant))


def load_base(cfg: Config) -> Loaded:
    """Load (or, for `tiny-*` names, randomly initialize) the base and quantize it.

    Real checkpoints are quantized tensor by tensor while they are read, so the float model
    never exists whole in host memory.
    """
    from jaxlora import io

    rules = _quant_rules(cfg)
    dtype = _DTYPES[cfg.model.param_dtype]
    name = cfg.model.name
    if name in _TINY:
        mcfg, tokenizer = _TINY[name]()
        params = models.init_params(mcfg, jax.random.key(cfg.train.seed), dtype=dtype)
        base, report = quant.quantize_tree(params, rules)
        return Loaded(mcfg, base, tokenizer, name, report)
    loaded = io.load_model(name, quant=None if rules.qtype == "none" else rules, dtype=dtype)
    _, report = quant.quantize_tree(loaded.params, dataclasses.replace(rules, qtype="none"))
    return Loaded(loaded.config, loaded.params, loaded.tokenizer, loaded.source, report)


_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _tiny(arch: str):
    def build():
        from jaxlora.io import Tokenizer

        tokenizer = Tokenizer.byte_level(_TINY_CHAT_TEMPLATE)
        vocab = tokenizer.vocab_size
        make = models.ModelConfig.tiny_llama if arch == "llama" else models.ModelConfig.tiny_gpt2
        mcfg = make(vocab_size=vocab, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
        return mcfg, tokenizer

    return build


_TINY: dict[str, Callable[[], tuple[models.ModelConfig, Any]]] = {
    "tiny-llama": _tiny("llama"),
    "tiny-gpt2": _tiny("gpt2"),
}


def make_lora_spec(cfg: Config) -> lora.LoraSpec:
    """The `LoraSpec` described by the config's `[lora]` section."""
    fields = dataclasses.asdict(cfg.lora)
    fields["exclude"] = fields["exclude"] or None
    return lora.LoraSpec(**fields)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The optax optimizer of the config's `[optim]` section (adapters only)."""
    o = cfg.optim
    extra = {"momentum": o.b1} if o.name == "sgd" else {"b1": o.b1, "b2": o.b2, "eps": o.eps}
    return optim.make_optimizer(
        name=o.name, lr=o.lr, schedule=o.schedule, warmup_steps=o.warmup_steps,
        total_steps=cfg.train.steps, weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm or None, min_lr_ratio=o.min_lr_ratio, **extra,
    )


def init_state(adapters: Adapters, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), adapters=adapters, opt_state=tx.init(adapters),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
    )


class _Setup(NamedTuple):
    loaded: Loaded
    base: Params  # the loaded base, or PiSSA's residual
    spec: lora.LoraSpec
    tx: optax.GradientTransformation
    state: TrainState  # freshly initialized (also the template a checkpoint restores into)
    base_record: dict[str, Any]


def _setup(cfg: Config) -> _Setup:
    """Base, adapters, optimizer and initial state of a config (deterministic in the seeds)."""
    from jaxlora import checkpoint as ckpt_lib

    loaded = load_base(cfg)
    spec = make_lora_spec(cfg)
    base = loaded.base
    if spec.init == "pissa":
        base, adapters = lora.init_pissa(base, spec)
    else:
        adapters = lora.init(jax.random.key(cfg.train.seed), base, spec)
    tx = make_optimizer(cfg)
    state = init_state(adapters, tx, cfg.train.seed)
    record = ckpt_lib.base_record(base, name=cfg.model.name, quant=dataclasses.asdict(cfg.quant))
    return _Setup(loaded, base, spec, tx, state, record)


def _manager(cfg: Config, run_dir: Path, setup: _Setup):
    from jaxlora import checkpoint as ckpt_lib

    return ckpt_lib.CheckpointManager(
        run_dir, save_every=cfg.checkpoint.every or cfg.train.steps, keep=cfg.checkpoint.keep,
        keep_best=1 if cfg.checkpoint.keep_best else 0, async_save=cfg.checkpoint.async_save,
        base=setup.base_record,
    )


def _datasets(cfg: Config, loaded: Loaded) -> data_lib.Datasets:
    d = cfg.data
    dcfg = data_lib.DataConfig(
        sources=d.sources, validation_sources=d.validation_sources,
        validation_fraction=d.validation_fraction, seq_len=d.seq_len, batch_size=d.batch_size,
        seed=d.seed, shuffle=d.shuffle, max_documents=d.max_documents or None, pack=d.pack,
    )
    return data_lib.load_datasets(dcfg, loaded.tokenizer,
                                  max_positions=loaded.config.max_position_embeddings)


class OpenRun(NamedTuple):
    config: Config
    loaded: Loaded
    base: Params
    adapters: Adapters
    step: int


def open_run(run_dir: str | os.PathLike) -> OpenRun:
    """The base and the latest checkpointed adapters of a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.toml)")
    cfg = load_config(run_dir / "config.toml")
    setup = _setup(cfg)
    restored = _manager(cfg, run_dir, setup).restore(setup.state)
    return OpenRun(cfg, setup.loaded, setup.base, restored.state.adapters, restored.step)


def load_for_inference(model: str, adapter: str | None = None, *, qtype: str = "none"
                       ) -> tuple[Loaded, Adapters | None]:
    """A base model (quantized on load unless qtype is "none") and optional adapters.

    `adapter` is a run directory (its own base is used) or a PEFT adapter folder.
    """
    from jaxlora.config import Config, ModelSection, QuantSection

    if adapter is not None and (Path(adapter) / "config.toml").is_file():
        opened = open_run(adapter)
        return opened.loaded._replace(base=opened.base), opened.adapters
    cfg = Config(model=ModelSection(name=model), quant=QuantSection(qtype=qtype))
    loaded = load_base(cfg)
    if adapter is None:
        return loaded, None
    from jaxlora.io import peft

    return loaded, peft.load_peft(adapter, loaded.base, loaded.config.arch)


def evaluate_run(run_dir: str | os.PathLike, max_batches: int | None = None) -> dict[str, Any]:
    """Held-out loss and perplexity of a run's latest adapters and of its bare base."""
    opened = open_run(run_dir)
    cfg = opened.config
    val = _datasets(cfg, opened.loaded).validation
    if val is None:
        raise ConfigError(f"{run_dir}: the run's config has no validation data")
    n = max_batches or cfg.eval.batches
    ev = make_eval_step(opened.loaded.config, compute_dtype=_DTYPES[cfg.model.compute_dtype])
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
        lines = [f"run {path} (step {opened.step})", f"model: {opened.loaded.source}",
                 f"adapters: {summ}"]
        if (path / "summary.json").is_file():
            s = json.loads((path / "summary.json").read_text())
            lines += [f"{k}: {v}" for k, v in s.items() if not isinstance(v, list | dict)]
        return "\n".join(lines)
    from jaxlora.config import Config, ModelSection, QuantSection

    loaded = load_base(Config(model=ModelSection(name=target), quant=QuantSection(qtype=qtype)))
    c, r = loaded.config, loaded.report
    lines = [f"model: {loaded.source}", f"architecture: {c.arch} ({c.name}), {c.num_layers} layers, "
             f"d={c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads} (q/kv), head_dim {c.head_dim}, "
             f"mlp {c.intermediate_size}, vocab {c.vocab_size}, tied={c.tie_embeddings}",
             f"parameters: {r.total_params:,} ({r.quantized_params:,} quantized as {qtype}, "
             f"{r.float_params:,} float)",
             f"bytes: {r.total_bytes / 2**20:.1f} MiB ({r.quantized_bytes / 2**20:.1f} MiB quantized, "
             f"{r.float_bytes / 2**20:.1f} MiB float), {8 * r.total_bytes / max(r.total_params, 1):.3f} bits/param"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Loss and steps
# --------------------------------------------------------------------------------------------
def _chunked_xent(mcfg, params, adapters, hidden: Array, targets: Array, mask: Array,
                  chunk: int, differentiable: bool = True) -> tuple[Array, Array]:
    """Sum of masked token cross-entropies and the count of masked tokens, in float32.

    hidden [B, T, d]; targets, mask [B, T]. Logits are built `chunk` tokens at a time and never
    kept: each chunk's gradient (softmax minus one-hot) is pulled back through the LM head
    right away, in the forward pass, so the backward pass neither stores nor recomputes the
    `[N, V]` logits. The loss is returned through a first-order surrogate whose gradient with
    respect to `hidden` and to the head's adapters is exactly those pulled-back gradients.
    With `differentiable=False` (evaluation) only the loss is computed.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)  # [N, d]
    t = targets.reshape(-1).astype(jnp.int32)
    m = mask.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    chunk = min(chunk, n)
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad))
        m = jnp.pad(m, (0, pad))
    h = h.reshape(-1, chunk, d)
    t = t.reshape(-1, chunk)
    m = m.reshape(-1, chunk)
    # Only the head's adapters (the tied embedding or lm_head) reach the logits.
    head_ad = None if adapters is None else {k: v for k, v in adapters.items() if k != "layers"}
    h_sg, ad_sg = jax.lax.stop_gradient((h, head_ad))

    def nll(logits, t_c, m_c):
        lse = jax.nn.logsumexp(logits, axis=-1)  # [chunk]
        gold = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return lse, jnp.sum((lse - gold) * m_c)

    if not differentiable:
        def loss_only(total, xs):
            h_c, t_c, m_c = xs
            return total + nll(models.logits(mcfg, params, h_c, ad_sg), t_c, m_c)[1], None

        total, _ = jax.lax.scan(loss_only, jnp.zeros((), jnp.float32), (h_sg, t, m))
        return total, jnp.sum(m)

    def body(carry, xs):
        total, d_ad = carry
        h_c, t_c, m_c = xs
        logits, pull = jax.vjp(lambda x, a: models.logits(mcfg, params, x, a), h_c, ad_sg)
        lse, loss = nll(logits, t_c, m_c)
        dlogits = jnp.exp(logits - lse[:, None]) * m_c[:, None]  # d loss / d logits
        dlogits = dlogits.at[jnp.arange(chunk), t_c].add(-m_c)
        dh_c, da = pull(dlogits)
        return (total + loss, jax.tree.map(jnp.add, d_ad, da)), dh_c

    zeros = jax.tree.map(jnp.zeros_like, ad_sg)
    (total, d_ad), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (h_sg, t, m))
    surrogate = jnp.sum(h * jax.lax.stop_gradient(dh)) + sum(
        jnp.sum(x * jax.lax.stop_gradient(g))
        for x, g in zip(jax.tree.leaves(head_ad), jax.tree.leaves(d_ad), strict=True))
    # value: exactly `total` (x - x == 0); gradient: that of the surrogate
    return surrogate - jax.lax.stop_gradient(surrogate) + total, jnp.sum(m)


def loss_and_count(adapters: Adapters, base: Params, batch: data_lib.Batch, *, mcfg,
                   dropout_key: Array | None = None, compute_dtype: Any = jnp.float32,
                   remat: str = "none", chunk: int = 128,
                   differentiable: bool = True) -> tuple[Array, Array]:
    """(sum of token losses, number of trained tokens) of one micro-batch.

    `differentiable=False` skips the LM-head gradient the loss otherwise forms in its forward
    pass (for evaluation; the loss itself is the same)."""
    hidden = models.forward(
        mcfg, base, batch.inputs, adapters=adapters, segment_ids=batch.segment_ids,
        positions=batch.positions, dropout_key=dropout_key, compute_dtype=compute_dtype,
        remat=remat, return_hidden=True,
    )
    return _chunked_xent(mcfg, base, adapters, hidden, batch.targets, batch.loss_mask, chunk,
                         differentiable)


def make_train_step(mcfg, tx: optax.GradientTransformation, *, compute_dtype=jnp.float32,
                    remat: str = "none", chunk: int = 128, dropout: bool = True):
    """A jitted `step(state, base, batches) -> (state, StepMetrics)`.

    `batches` is a `Batch` whose arrays carry a leading micro-batch axis `[accum, B, T]`.
    The state is donated. A non-finite loss or gradient leaves the state unchanged and
    reports `finite=False` (the caller stops the run). `chunk` tokens' logits exist at a time
    (128 x 49152 float32 = 24 MiB for SmolLM2; 256 costs 44 MiB more peak for ~1% less time).
    """

    def micro(adapters, base, batch, key):
        def f(a):
            return loss_and_count(a, base, batch, mcfg=mcfg, dropout_key=key,
                                  compute_dtype=compute_dtype, remat=remat, chunk=chunk)

        (loss_sum, count), grads = jax.value_and_grad(f, has_aux=True)(adapters)
        return loss_sum, count, grads

    def step(state: TrainState, base: Params, batches: data_lib.Batch):
        accum = batches.inputs.shape[0]
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        keys = jax.random.split(key, accum)

        def body(carry, xs):
            loss_sum, count, grads = carry
            batch, k = xs
            ls, c, g = micro(state.adapters, base, batch, k if dropout else None)
            return (loss_sum + ls, count + c, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, state.adapters)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (loss_sum, count, grads), _ = jax.lax.scan(body, init, (batches, keys))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.adapters)
        adapters = optax.apply_updates(state.adapters, updates)
        new = TrainState(state.step + 1, adapters, opt_state, state.rng)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return new, StepMetrics(loss, count, grad_norm, finite)

    return jax.jit(step, donate_argnums=(0,))


def compile_step(step_fn, *args: Any):
    """`step_fn` (a jitted step) compiled ahead of time for `args`, the compiler's freed
    memory handed back to the OS before the first step allocates its buffers (otherwise the
    peak RSS counts both: ~170 MiB more for SmolLM2)."""
    compiled = step_fn.lower(*args).compile()
    memory.return_freed_memory()
    return compiled


def make_eval_step(mcfg, *, compute_dtype=jnp.float32, chunk: int = 256):
    """A jitted `eval(adapters_or_None, base, batch) -> (loss_sum, count)`."""

    def ev(adapters, base, batch):
        return loss_and_count(adapters, base, batch, mcfg=mcfg, compute_dtype=compute_dtype,
                              chunk=chunk, differentiable=False)

    return jax.jit(ev)


def evaluate(eval_step, adapters, base, batches: Iterator[data_lib.Batch], max_batches: int
             ) -> dict[str, float]:
    """Held-out loss and perplexity over at most `max_batches` batches."""
    total, count = 0.0, 0.0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        ls, c = eval_step(adapters, base, _device_batch(batch))
        total += float(ls)
        count += float(c)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(count)}


def _device_batch(batch: data_lib.Batch) -> data_lib.Batch:
    return data_lib.Batch(*(jnp.asarray(x) for x in batch))


def _stack(batches: list[data_lib.Batch]) -> data_lib.Batch:
    return data_lib.Batch(*(jnp.asarray(np.stack(xs)) for xs in zip(*batches, strict=True)))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_run_dir(cfg: Config, run_dir: Path) -> bool:
    """True when `run_dir` holds this same run (resume); refuse a directory of anything else.

    Reads only: the directory is created by `_create_run_dir` once the model and the data have
    loaded, so a run that fails on bad input leaves nothing behind.
    """
    saved = run_dir / "config.toml"
    if saved.exists():
        if not _same_run(load_config(saved), cfg):
            raise ConfigError(
                f"{run_dir}: holds a different run (its config.toml differs); choose another "
                f"name (--set name=...) or output_dir instead of overwriting it"
            )
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: exists and is not a jaxlora run directory; not touching it")
    return False


def _same_run(a: Config, b: Config) -> bool:
    """Equal up to settings that do not change what a run computes (the progress bar)."""
    def norm(c: Config) -> Config:
        return dataclasses.replace(c, train=dataclasses.replace(c.train, progress=True))

    return norm(a) == norm(b)


def _create_run_dir(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / "config.toml", dump_config(cfg))


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the current step, save and exit cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: Config, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one experiment into `run_dir` (default `output_dir/name`) and return its summary.

    Writes `config.toml` (the resolved config), `metrics.jsonl`, `checkpoints/`,
    `summary.json`, `loss.png` and `samples.txt`. A run directory that already holds the
    same config is resumed from its latest checkpoint; one holding another config is refused.
    """
    run_dir = Path(run_dir if run_dir is not None else Path(cfg.output_dir) / cfg.name)
    resuming = _check_run_dir(cfg, run_dir)
    summary_path = run_dir / "summary.json"
    if resuming and summary_path.exists():
        _log(f"jaxlora: {run_dir} is already finished; summary.json left as it is")
        return json.loads(summary_path.read_text())

    t_start = time.perf_counter()
    setup = _setup(cfg)
    loaded, base, spec, tx, state = setup.loaded, setup.base, setup.spec, setup.tx, setup.state
    mcfg, tokenizer = loaded.config, loaded.tokenizer
    datasets = _datasets(cfg, loaded)
    if not resuming:
        _create_run_dir(cfg, run_dir)
    summ = lora.summary(base, state.adapters)
    _log(f"jaxlora: model {loaded.source} ({mcfg.name}), base {loaded.report.total_bytes / 2**20:.1f} MiB "
         f"({cfg.quant.qtype}); {summ}")

    compute_dtype = _DTYPES[cfg.model.compute_dtype]
    step_fn = make_train_step(mcfg, tx, compute_dtype=compute_dtype, remat=cfg.model.remat,
                              dropout=spec.dropout > 0)
    eval_fn = make_eval_step(mcfg, compute_dtype=compute_dtype)

    manager = _manager(cfg, run_dir, setup)
    position: Mapping[str, int] | None = None
    resumed_metrics: dict[str, float] = {}
    metrics_path = run_dir / "metrics.jsonl"
    if resuming and cfg.checkpoint.resume and manager.latest_step() is not None:
        restored = manager.restore(state)
        state, position = restored.state, restored.data_position
        resumed_metrics = restored.metrics
        # records written after the restored step (a fallback past a damaged checkpoint, or
        # a crash between a log line and the next save) are replayed: drop them
        _truncate_metrics(metrics_path, restored.step)
        _log(f"jaxlora: resumed {run_dir} at step {restored.step}")
    train_iter = datasets.train.iterator(position)

    def val_metrics(adapters_or_none) -> dict[str, float]:
        if datasets.validation is None:
            return {}
        out = evaluate(eval_fn, adapters_or_none, base, datasets.validation.eval_batches(),
                       cfg.eval.batches)
        memory.return_freed_memory()  # the eval buffers, before the train step's land beside them
        return out

    start_step = int(state.step)
    with open(metrics_path, "a") as mf, _StopFlag() as stop, manager:
        def emit(record: dict[str, Any]) -> None:
            mf.write(json.dumps(record) + "\n")
            mf.flush()

        before = val_metrics(None)  # the base's held-out loss (summary: val_loss_before)
        if start_step == 0 and before:
            emit({"step": 0, **before})
            _log(f"jaxlora: held-out loss before training {before['val_loss']:.4f} "
                 f"(ppl {before['val_ppl']:.2f})")
        last_val = resumed_metrics.get("val_loss", before.get("val_loss"))

        bar = _progress(cfg, start_step)
        window: list[tuple[float, float]] = _window_from(resumed_metrics)
        t_window = time.perf_counter()
        tokens_per_s = 0.0
        step = start_step
        stopped_by = None
        compiled_step = None
        while step < cfg.train.steps:
            batches = _stack([next(train_iter) for _ in range(cfg.train.grad_accum)])
            if compiled_step is None:
                compiled_step = compile_step(step_fn, state, base, batches)
            new_state, m = compiled_step(state, base, batches)
            if not bool(m.finite):
                state = new_state  # unchanged copy of the last good state
                manager.save(step, state, data_position=train_iter.state().as_dict(),
                             metrics={}, force=True)
                raise NonFiniteError(
                    f"step {step + 1}: non-finite loss or gradient (loss={float(m.loss)}, "
                    f"grad_norm={float(m.grad_norm)}); stopped, last good adapters saved at "
                    f"step {step} in {manager.directory}"
                )
            state = new_state
            step += 1
            ntok = float(jnp.sum(batches.segment_ids > 0))
            window.append((float(m.loss), ntok))
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                dt = time.perf_counter() - t_window
                tokens_per_s = sum(t for _, t in window) / max(dt, 1e-9)
                rec = {"step": step, "loss": float(np.mean([x for x, _ in window])),
                       "grad_norm": float(m.grad_norm), "lr": _lr(cfg, step),
                       "tokens_per_s": tokens_per_s, "elapsed_s": time.perf_counter() - t_start}
                emit(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
                window, t_window = [], time.perf_counter()
            bar.update(1)
            val = {}
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                val = val_metrics(state.adapters)
                if val:
                    emit({"step": step, **val})
                    last_val = val["val_loss"]
            final = step == cfg.train.steps
            if (manager.should_save(step) and not final) or stop.signal is not None:
                saved = {"val_loss": last_val} if last_val is not None else {}
                manager.save(step, state, data_position=train_iter.state().as_dict(),
                             metrics={**saved, **_window_metrics(window)},
                             force=stop.signal is not None)
            if stop.signal is not None:
                stopped_by = signal.Signals(stop.signal).name
                break
        bar.close()
        if stopped_by:
            manager.wait()
            _log(f"jaxlora: {stopped_by} received; saved step {step} in {manager.directory}; "
                 f"run the same command again to resume")
            return {"stopped": stopped_by, "step": step}

        after = val_metrics(state.adapters)
        if after:
            emit({"step": step, **after})
        manager.save(step, state, data_position=train_iter.state().as_dict(),
                     metrics={"val_loss": after["val_loss"]} if after else {}, force=True)

    memory.return_freed_memory()  # the step's buffers, before the generation programs compile
    samples = _samples(cfg, mcfg, base, tokenizer, state.adapters, compute_dtype)
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train_losses = [r["loss"] for r in records if "loss" in r]
    summary = {
        "name": cfg.name,
        "model": loaded.source,
        "qtype": cfg.quant.qtype,
        "steps": step,
        "train_loss": train_losses[-1] if train_losses else None,
        "val_loss_before": before.get("val_loss"),
        "val_loss": after.get("val_loss"),
        "val_ppl": after.get("val_ppl"),
        "tokens_per_s": tokens_per_s,
        "peak_rss_mb": memory.peak_rss_mb(),
        "base_bytes": loaded.report.total_bytes,
        "adapter_params": summ.trainable,
        "adapter_bytes": summ.adapter_bytes,
        "wall_s": time.perf_counter() - t_start,
        "samples": samples,
    }
    _write_atomic(summary_path, json.dumps(summary, indent=2))
    _plot_loss(records, run_dir / "loss.png", cfg.name)
    _write_samples(run_dir / "samples.txt", samples)
    return summary


def _window_metrics(window: list[tuple[float, float]]) -> dict[str, float]:
    """The not yet logged (loss, tokens) of the current log window, as checkpoint metrics."""
    out = {}
    for i, (loss, tokens) in enumerate(window):
        out[f"log_window/{i:05d}/loss"] = loss
        out[f"log_window/{i:05d}/tokens"] = tokens
    return out


def _window_from(metrics: Mapping[str, float]) -> list[tuple[float, float]]:
    n = sum(1 for k in metrics if k.startswith("log_window/") and k.endswith("/loss"))
    return [(float(metrics[f"log_window/{i:05d}/loss"]), float(metrics[f"log_window/{i:05d}/tokens"]))
            for i in range(n)]


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of metrics.jsonl up to `step` (and drop a line cut short)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    if keep != lines:
        _write_atomic(path, "".join(x + "\n" for x in keep))


def _lr(cfg: Config, step: int) -> float:
    return float(optim.make_schedule(
        lr=cfg.optim.lr, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps,
        total_steps=cfg.train.steps, min_lr_ratio=cfg.optim.min_lr_ratio)(step))


def _progress(cfg: Config, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.steps, initial=start, disable=not cfg.train.progress,
                desc=cfg.name, unit="step", dynamic_ncols=True, file=sys.stderr)


def _samples(cfg: Config, mcfg, base, tokenizer, adapters, compute_dtype) -> list[dict[str, str]]:
    """Greedy completions of the configured prompts, without and with the adapters."""
    if not cfg.eval.samples:
        return []
    from jaxlora import generate

    prompts = list(cfg.eval.samples)
    kw = dict(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
              chat=tokenizer.chat_template is not None)
    before = generate.generate(mcfg, base, tokenizer, prompts, **kw)
    after = generate.generate(mcfg, base, tokenizer, prompts, adapters=adapters, **kw)
    return [{"prompt": p, "base": b, "adapted": a}
            for p, b, a in zip(prompts, before, after, strict=True)]


def _write_samples(path: Path, samples: list[dict[str, str]]) -> None:
    parts = []
    for s in samples:
        parts.append(f"### prompt\n{s['prompt']}\n\n### base model\n{s['base']}\n\n"
                     f"### with adapters\n{s['adapted']}\n")
    _write_atomic(path, "\n".join(parts))


def _plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
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
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
