"""Training: the pure steps (`step`), the loop with hooks (`loop`), the pieces a config
determines (`assemble`) and run directories (`runs`).

    from jaxlora import train
    summary = train.run(config)                         # config.toml in, run directory out
    opened = train.open_run("runs/qlora-smollm2")       # its base and latest adapters

The step is a pure jitted `(state, base, batches) -> (state, metrics)` with gradients and
optimizer state for the adapters alone; the loop only steps and calls hooks; a run directory
is created, checked, resumed and read back by `runs`.
"""

from jaxlora.train import assemble, loop, runs, step
from jaxlora.train.assemble import Loaded, Setup, load_base, make_datasets, setup
from jaxlora.train.loop import Hook, StepInfo, train_loop
from jaxlora.train.runs import OpenRun, describe, evaluate_run, load_for_inference, open_run, run
from jaxlora.train.step import (
    NonFiniteError,
    StepMetrics,
    TrainState,
    chunked_xent,
    compile_step,
    evaluate,
    init_state,
    loss_and_count,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "step", "loop", "assemble", "runs",
    # the step
    "TrainState", "StepMetrics", "NonFiniteError", "init_state", "chunked_xent",
    "loss_and_count", "make_train_step", "compile_step", "make_eval_step", "evaluate",
    # the loop
    "StepInfo", "Hook", "train_loop",
    # run directories
    "Loaded", "Setup", "OpenRun", "load_base", "make_datasets", "setup", "run", "open_run",
    "evaluate_run", "load_for_inference", "describe",
]
