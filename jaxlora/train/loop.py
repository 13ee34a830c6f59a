"""The training loop: a few lines that step, and hooks that do everything else.

`train_loop` only draws batches, runs the compiled step and calls the hooks after each step
with a `StepInfo`; logging, evaluation, checkpointing and stop signals are hooks the caller
registers (the way Levanter's trainer takes them), so a population of adapters or a sharded
run reuses the loop and swaps hooks. `MetricsLog` writes `metrics.jsonl` and the progress bar;
`eval_hook` and `checkpoint_hook` build the other two standard hooks on it.

A step whose loss or gradients are not finite leaves the state unchanged (the step itself
guards); the loop then raises `NonFiniteStep` carrying that last good state, so the caller
can save it before reporting.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import jax
import numpy as np

from jaxlora import data as data_lib
from jaxlora.train.step import StepMetrics, TrainState, compile_step, device_batch, stack_batches

__all__ = [
    "StepInfo",
    "Hook",
    "NonFiniteStep",
    "StopSignals",
    "train_loop",
    "MetricsLog",
    "tensorboard",
    "eval_hook",
    "checkpoint_hook",
]


class StepInfo(NamedTuple):
    """What a hook sees after each step."""

    step: int  # steps done (the state's step)
    state: TrainState
    metrics: StepMetrics
    tokens: float  # tokens in the step's batches (padding excluded)
    final: bool  # the last step of the run
    stop: str | None  # the name of a stop signal received during the step, else None


Hook = Callable[[StepInfo], None]


class NonFiniteStep(Exception):
    """Raised by `train_loop` when a step was not finite; `state` is the last good one."""

    def __init__(self, step: int, state: TrainState, metrics: StepMetrics):
        super().__init__(f"step {step + 1}: non-finite loss or gradient")
        self.step, self.state, self.metrics = step, state, metrics


class StopSignals:
    """While entered, SIGINT/SIGTERM ask the loop to finish the current step and stop."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name

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


def train_loop(step_fn, state: TrainState, base: Any, batches: Iterator[data_lib.Batch], *,
               steps: int, grad_accum: int = 1, hooks: Sequence[Hook] = (),
               stop: StopSignals | None = None,
               place: Callable[[data_lib.Batch], data_lib.Batch] = device_batch
               ) -> StepInfo | None:
    """Train from `state.step` to `steps`, calling each hook after every step.

    `step_fn` is a jitted step (`make_train_step`), compiled ahead of time on the first
    batch; `place` puts each stacked host batch on the devices (`jaxlora.sharding.put_batch`
    on a mesh). Returns the last step's `StepInfo` (its `stop` set when a signal ended the run
    early), or None when there was nothing left to do.
    """
    step, compiled, info = int(state.step), None, None
    while step < steps:
        host = stack_batches([next(batches) for _ in range(grad_accum)])
        batch = place(host)
        # tokens of the global batch: this host's rows, or every host's (a device sum)
        tokens = float(np.sum(host.segment_ids > 0) if jax.process_count() == 1
                       else jax.numpy.sum(batch.segment_ids > 0))
        if compiled is None:
            compiled = compile_step(step_fn, state, base, batch)
        new_state, m = compiled(state, base, batch)
        if not np.any(m.finite):  # (a population goes on while any member is finite)
            raise NonFiniteStep(step, new_state, m)  # new_state: unchanged copy of the last good
        state, step = new_state, step + 1
        info = StepInfo(step, state, m, tokens, step == steps, None if stop is None else stop.name)
        for hook in hooks:
            hook(info)
        if info.stop is not None:
            break
    return info


class MetricsLog:
    """Appends records to `metrics.jsonl` and logs the mean training loss every `log_every`.

    The losses of a log window not yet written are part of what a checkpoint saves
    (`window_metrics`), so a resumed run writes the same records an uninterrupted one would.
    """

    def __init__(self, file: IO[str], *, log_every: int, steps: int, lr: Callable[[int], float],
                 t_start: float, progress: Any = None, window: Mapping[str, float] | None = None,
                 sinks: Sequence[Callable[[dict[str, Any]], None]] = ()):
        self.file, self.log_every, self.steps, self.lr = file, log_every, steps, lr
        self.sinks = tuple(sinks)  # also given every record (e.g. `tensorboard`)
        self.t_start, self.progress = t_start, progress
        self.window = _window_from(window or {})
        self.t_window = time.perf_counter()
        self.tokens_per_s = 0.0
        self.last_val: float | None = None

    def emit(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink(record)

    def __call__(self, info: StepInfo) -> None:
        self.window.append((float(info.metrics.loss), info.tokens))
        if info.step % self.log_every == 0 or info.final:
            dt = time.perf_counter() - self.t_window
            self.tokens_per_s = sum(t for _, t in self.window) / max(dt, 1e-9)
            rec = {"step": info.step, "loss": float(np.mean([x for x, _ in self.window])),
                   "grad_norm": float(info.metrics.grad_norm), "lr": self.lr(info.step),
                   "tokens_per_s": self.tokens_per_s,
                   "elapsed_s": time.perf_counter() - self.t_start}
            self.emit(rec)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{rec['loss']:.3f}",
                                          tok_s=f"{self.tokens_per_s:.0f}")
            self.window, self.t_window = [], time.perf_counter()
        if self.progress is not None:
            self.progress.update(1)

    def window_metrics(self) -> dict[str, float]:
        """The last validation loss and the unlogged window, as checkpoint metrics."""
        out = {} if self.last_val is None else {"val_loss": self.last_val}
        for i, (loss, tokens) in enumerate(self.window):
            out[f"log_window/{i:05d}/loss"] = loss
            out[f"log_window/{i:05d}/tokens"] = tokens
        return out


@contextlib.contextmanager
def tensorboard(folder: Path, enabled: bool, resumed_at: int = -1) -> Iterator[list]:
    """``[sink]`` writing each metrics record's numbers as TensorBoard scalars (tensorboardX
    event files in `folder`, tag = the record's key, step = its ``step``), or ``[]`` when not
    `enabled`. A run resumed at a checkpoint of step `resumed_at` first purges the events an
    interrupted run wrote after it, as `metrics.jsonl` drops its later records."""
    if not enabled:
        yield []
        return
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        from jaxlora.errors import ConfigError

        raise ConfigError("train.tensorboard: needs tensorboardX (pip install "
                          "'jaxlora[tensorboard]')") from None
    writer = SummaryWriter(str(folder), purge_step=resumed_at + 1 if resumed_at >= 0 else None)

    def sink(record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, record["step"])
        writer.flush()

    try:
        yield [sink]
    finally:
        writer.close()


def _window_from(metrics: Mapping[str, float]) -> list[tuple[float, float]]:
    n = sum(1 for k in metrics if k.startswith("log_window/") and k.endswith("/loss"))
    return [(float(metrics[f"log_window/{i:05d}/loss"]),
             float(metrics[f"log_window/{i:05d}/tokens"])) for i in range(n)]


def eval_hook(log: MetricsLog, evaluate: Callable[[Any], dict[str, float]], every: int) -> Hook:
    """Every `every` steps (not the final one, which the caller evaluates), evaluate the
    adapters, write the record and remember the validation loss for checkpoints."""

    def hook(info: StepInfo) -> None:
        if every and info.step % every == 0 and not info.final:
            val = evaluate(info.state.adapters)
            if val:
                log.emit({"step": info.step, **val})
                log.last_val = val["val_loss"]

    return hook


def checkpoint_hook(manager: Any, log: MetricsLog, data_position: Callable[[], dict]) -> Hook:
    """Save on the manager's schedule (not the final step, saved by the caller after its
    evaluation) and at once when a stop signal arrived."""

    def hook(info: StepInfo) -> None:
        if (manager.should_save(info.step) and not info.final) or info.stop is not None:
            manager.save(info.step, info.state, data_position=data_position(),
                         metrics=log.window_metrics(), force=info.stop is not None)

    return hook

