"""Populations: K adapters trained at once, in one jitted step, over one shared frozen base.

A sweep over rank, alpha, scaling, learning rate, initialization or seed trains K adapters of
the same base. Trained one at a time, each run loads the base, compiles and steps alone; a
population holds the base (float or 4-bit `QTensor`s) once and trains all members in one
program. Member ``k`` owns rows ``[k*B, (k+1)*B)`` of a ``[K*B, T]`` batch (by default every
member sees the same ``B`` rows, so data order is no confound in a sweep; optionally each its
own stream). Each targeted projection computes, per row ``i`` of member ``k = i // B``,

    y_i = x_i @ dequant(Wq) + s_k * dropout_k(x_i) @ A_k @ B_k

with the base matmul run once over all rows and the low-rank path gathered per row
(`jaxlora.multi`, the S-LoRA / Punica layout, here under autodiff). Ranks are zero-padded to
the largest: the padded columns of A and rows of B get exactly zero gradient, so they stay
zero and the member trains as its own rank. A member that does not target a leaf contributes
zero there.

Each member keeps its own `train.TrainState` (adapters, optax state of its own optimizer and
schedule, dropout key) and loss normalization (mean over its own trained tokens), so a member
computes what `jaxlora train` of the same config computes, up to float summation order. A
member whose loss or gradient is not finite is frozen at its last finite adapters and
recorded as diverged; the others go on unchanged (their rows never mix with its rows).
"""

from jaxlora.population.runs import (
    MEMBER_KEYS,
    check_shared,
    estimate_bytes,
    group_key,
    memory_budget,
    plan_size,
    run,
)
from jaxlora.population.step import (
    LAYOUTS,
    Member,
    PopulationMetrics,
    PopulationState,
    TrainResult,
    check_members,
    default_layout,
    init,
    make_eval_step,
    make_step,
    train,
)

__all__ = [
    "Member", "LAYOUTS", "default_layout", "PopulationState", "PopulationMetrics", "TrainResult", "check_members", "init",
    "make_step", "make_eval_step", "train",
    # run directories
    "MEMBER_KEYS", "check_shared", "group_key", "estimate_bytes", "memory_budget", "plan_size",
    "run",
]
