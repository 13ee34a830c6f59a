"""The optax transformations of the adapters: schedules, the optimizer of an `OptimSpec`,
and `adapters_only` (``optax.partition`` + ``optax.set_to_zero``) for combined trees.

See the `jaxlora.optim` docstring for why the optimizer sees the adapters only.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from jaxlora.lora import LoraPair, LoraWeight
from jaxlora.optim.spec import SCHEDULES, OptimSpec

__all__ = [
    "TRAINABLE",
    "FROZEN",
    "make_schedule",
    "make_optimizer",
    "optax_optimizer",
    "adapter_labels",
    "adapters_only",
    "lora_plus_labels",
]

TRAINABLE = "adapters"
FROZEN = "frozen"
LORA_A, LORA_B = "lora_a", "lora_b"  # LoRA+'s two learning-rate groups


def make_schedule(
    lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Learning rate vs step: linear warmup from 0 over ``warmup_steps``, then
    "constant", "linear" or "cosine" decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "constant":
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(
                f"schedule {schedule!r} needs total_steps > warmup_steps, got "
                f"total_steps={total_steps}, warmup_steps={warmup_steps}"
            )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    end = lr * min_lr_ratio
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps, end)
    if schedule == "linear":
        decay = optax.linear_schedule(lr, end, total_steps - warmup_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return decay
    warm = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warm, decay], [warmup_steps])


def optax_optimizer(
    name: str, learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0, **kwargs: Any
) -> optax.GradientTransformation:
    """``optax.<name>(learning_rate, ...)`` for any optax optimizer alias, checked.

    Args:
      name: an optax alias taking ``learning_rate`` ("adamw", "lion", "adafactor", ...).
      learning_rate: a float or a schedule (e.g. from `make_schedule`).
      weight_decay: passed to optimizers that take ``weight_decay`` (decoupled, e.g. adamw);
        a ValueError for optimizers that do not.
      **kwargs: extra keyword arguments of the optax optimizer (``b1``, ``eps``, ...).
    """
    fn = getattr(optax, name, None)
    params = inspect.signature(fn).parameters if callable(fn) else {}
    if "learning_rate" not in params:
        names = [n for n in dir(optax) if not n.startswith("_")]
        near = difflib.get_close_matches(name, names, n=3)
        raise ValueError(f"unknown optax optimizer {name!r}; closest: {near}")
    if weight_decay:
        if "weight_decay" not in params:
            raise ValueError(f"optax.{name} takes no weight_decay; use e.g. 'adamw'")
        kwargs["weight_decay"] = weight_decay
    return fn(learning_rate=learning_rate, **kwargs)


def make_optimizer(
    spec: OptimSpec, total_steps: int | None = None
) -> optax.GradientTransformation:
    """The adapter optimizer of ``spec``: ``clip_by_global_norm -> optax.<name>``.

    With ``spec.lora_plus_ratio != 1`` (LoRA+, Hayou et al. 2024, arXiv 2402.12354) the
    optimizer is ``optax.partition`` over `lora_plus_labels`: the same optimizer twice, A at
    the schedule and B (and DoRA's magnitude, as PEFT's ``create_loraplus_optimizer`` groups
    it with B) at ``ratio x`` the schedule; clipping stays global over both.

    Args:
      spec: the optimizer, its schedule and hyperparameters.
      total_steps: the step at which a linear/cosine schedule reaches ``min_lr_ratio * lr``
        (needed unless ``spec.schedule == "constant"``).
    """
    s = spec
    if not s.lora_plus_ratio > 0:
        raise ValueError(f"optim.lora_plus_ratio must be > 0 (1 = plain LoRA), got {s.lora_plus_ratio!r}")
    lr = make_schedule(s.lr, s.schedule, s.warmup_steps, total_steps, s.min_lr_ratio)
    hyper = {"momentum": s.b1} if s.name == "sgd" else {"b1": s.b1, "b2": s.b2, "eps": s.eps}
    opt = optax_optimizer(s.name, lr, weight_decay=s.weight_decay, **hyper)
    if s.lora_plus_ratio != 1.0:
        ratio = float(s.lora_plus_ratio)
        fast = optax_optimizer(s.name, lambda count: ratio * lr(count),
                               weight_decay=s.weight_decay, **hyper)
        opt = optax.partition({LORA_A: opt, LORA_B: fast}, lora_plus_labels)
    if not s.max_grad_norm:
        return opt
    return optax.chain(optax.clip_by_global_norm(s.max_grad_norm), opt)


def lora_plus_labels(tree: Any) -> Any:
    """LoRA+'s label per leaf: `LORA_B` for the ``b`` (and DoRA ``m``) children of adapter
    leaves, `LORA_A` for everything else (``a``), from the leaves' attribute names."""

    def label(path: tuple, _: Any) -> str:
        last = path[-1] if path else None
        return LORA_B if isinstance(last, jax.tree_util.GetAttrKey) and last.name in ("b", "m") else LORA_A

    return jax.tree_util.tree_map_with_path(label, tree)


def adapter_labels(tree: Any) -> Any:
    """A label pytree (same structure as ``tree``): ``"adapters"`` or ``"frozen"`` per leaf.

    Trainable leaves are the ``a`` / ``b`` (and DoRA ``m``) children of every `LoraPair` /
    `LoraWeight` and everything under a top-level ``"adapters"`` key; all other leaves (base
    arrays, QTensor codes and scales, dropout keys) are frozen.
    """

    def lab(node: Any, trainable: bool) -> Any:
        if isinstance(node, LoraPair):
            return dataclasses.replace(node, a=lab(node.a, True), b=lab(node.b, True),
                                       m=lab(node.m, True))
        if isinstance(node, LoraWeight):
            return dataclasses.replace(node, w=lab(node.w, False), a=lab(node.a, True),
                                       b=lab(node.b, True), m=lab(node.m, True),
                                       key=lab(node.key, False))
        if isinstance(node, Mapping):
            return {k: lab(v, trainable) for k, v in node.items()}
        return jax.tree.map(lambda _: TRAINABLE if trainable else FROZEN, node)

    if isinstance(tree, Mapping):
        return {k: lab(v, k == TRAINABLE) for k, v in tree.items()}
    return lab(tree, False)


def adapters_only(
    tx: optax.GradientTransformation, tree_or_labels: Any | Callable[[Any], Any]
) -> optax.GradientTransformation:
    """Apply ``tx`` to the adapter leaves only; every other leaf is frozen.

    Built from ``optax.partition({"adapters": tx, "frozen": optax.set_to_zero()}, labels)``:
    frozen leaves get exact zero updates and hold no optimizer state (Adam state is
    ``2 x`` the adapter bytes), and clipping / weight decay inside ``tx`` see adapters only.

    Args:
      tx: the adapter optimizer, e.g. from `make_optimizer`.
      tree_or_labels: a parameter tree (labels are derived with `adapter_labels`), a label
        tree of "adapters" / "frozen" strings, or a callable ``params -> labels``.
    """
    if callable(tree_or_labels):
        labels = tree_or_labels
    else:
        leaves = jax.tree.leaves(tree_or_labels)
        if leaves and all(isinstance(x, str) for x in leaves):
            bad = sorted({x for x in leaves} - {TRAINABLE, FROZEN})
            if bad:
                raise ValueError(f"labels must be {TRAINABLE!r} or {FROZEN!r}, got {bad}")
            labels = tree_or_labels
        else:
            labels = adapter_labels(tree_or_labels)
            if TRAINABLE not in jax.tree.leaves(labels):
                raise ValueError("adapters_only: the tree has no adapter (LoraPair) leaves")
    return optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
