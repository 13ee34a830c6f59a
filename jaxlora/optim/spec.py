"""`OptimSpec`: the ``[optim]`` table of a config (imports no JAX, so configs load without it).

`jaxlora.optim.make_optimizer` turns it into the optax transformation of the adapters.
"""

from __future__ import annotations

import dataclasses

from jaxlora import schema

__all__ = ["OptimSpec", "SCHEDULES", "OPTIMIZERS"]

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam", "sgd")  # the ones whose hyperparameters OptimSpec names


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """The optimizer of the adapters (the base never gets optimizer state).

    The ``[optim]`` table of a config file; `make_optimizer` turns it into an optax
    transformation. For an optax optimizer not named here, see `optax_optimizer`.
    """

    name: str = schema.field(
        "adamw", "Optimizer: adamw, adam, or sgd (with momentum b1).", choices=OPTIMIZERS
    )
    lr: float = schema.field(2e-4, "Peak learning rate.", gt=0)
    schedule: str = schema.field(
        "cosine", "Learning-rate decay after warmup: constant, linear, or cosine.",
        choices=SCHEDULES,
    )
    warmup_steps: int = schema.field(
        0, "Linear warmup steps from 0 to `lr` (<= train.steps).", ge=0
    )
    min_lr_ratio: float = schema.field(
        0.0, "Final learning rate as a fraction of `lr` for linear/cosine decay.", ge=0, le=1
    )
    weight_decay: float = schema.field(
        0.0, "Decoupled weight decay on the adapters (adamw).", ge=0
    )
    max_grad_norm: float = schema.field(
        1.0, "Clip the global gradient norm to this (0 = no clipping).", ge=0
    )
    b1: float = schema.field(0.9, "Adam beta1 / SGD momentum.", ge=0, lt=1)
    b2: float = schema.field(0.999, "Adam beta2.", ge=0, lt=1)
    eps: float = schema.field(1e-8, "Adam epsilon.", gt=0)
    lora_plus_ratio: float = schema.field(
        1.0, "LoRA+ (Hayou et al. 2024): B (and DoRA's magnitude) learns at this multiple of "
        "lr, A at lr; 1 = plain LoRA, the paper suggests 16.", gt=0
    )

    def __post_init__(self):
        schema.check_fields(self)
