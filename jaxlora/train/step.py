"""The pure training and evaluation steps: loss, gradients of the adapters alone, optax update.

The frozen base (float or `QTensor` leaves) is an argument of the step, never part of the
trained state: `jax.grad` is taken with respect to the adapters alone and the optax
transformation from `jaxlora.optim` only ever sees the adapter tree, so the base carries no
gradient and no optimizer state (Dettmers et al. 2023, "QLoRA", arXiv 2305.14314).

The loss is the masked next-token cross-entropy in float32. The vocabulary projection is
computed in chunks of tokens, so the `[tokens, vocab]` logits never exist whole (49k-entry
vocabularies dominate a small model's activation memory otherwise). Gradient accumulation sums
per-token losses and gradients over micro-batches and divides by the total number of trained
tokens once, so it equals the full batch exactly (up to float summation order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora import data as data_lib
from jaxlora import lora, memory, models
from jaxlora.errors import JaxloraError

__all__ = [
    "TrainState",
    "StepMetrics",
    "NonFiniteError",
    "init_state",
    "chunked_xent",
    "loss_and_count",
    "make_train_step",
    "compile_step",
    "make_eval_step",
    "evaluate",
    "device_batch",
    "stack_batches",
]

Array = jax.Array
Params = lora.Params
Adapters = lora.Adapters


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


def init_state(adapters: Adapters, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: the adapters, their optimizer state, and the dropout key of `seed`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), adapters=adapters, opt_state=tx.init(adapters),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
    )


def _chunks(hidden: Array, targets: Array, mask: Array, chunk: int):
    """hidden [B, T, d], targets/mask [B, T] -> [n_chunks, chunk, d], [n_chunks, chunk] x 2."""
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
    return h.reshape(-1, chunk, d), t.reshape(-1, chunk), m.reshape(-1, chunk)


def _nll(logits: Array, t_c: Array, m_c: Array) -> tuple[Array, Array]:
    """(logsumexp [chunk], summed masked negative log-likelihood) of one chunk."""
    lse = jax.nn.logsumexp(logits, axis=-1)  # [chunk]
    gold = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
    return lse, jnp.sum((lse - gold) * m_c)


@jax.named_scope("loss")
def chunked_xent(mcfg, params, adapters, hidden: Array, targets: Array, mask: Array,
                 chunk: int, differentiable: bool = True) -> tuple[Array, Array]:
    """Sum of masked token cross-entropies and the count of masked tokens, in float32.

    hidden [B, T, d]; targets, mask [B, T]. Logits are built `chunk` tokens at a time and never
    kept: each chunk's gradient (softmax minus one-hot) is pulled back through the LM head
    right away, in the forward pass, so the backward pass neither stores nor recomputes the
    `[N, V]` logits. The loss is returned through a first-order surrogate whose gradient with
    respect to `hidden` and to the head's adapters is exactly those pulled-back gradients.
    With `differentiable=False` (evaluation) only the loss is computed.
    """
    h, t, m = _chunks(hidden, targets, mask, chunk)
    chunk = h.shape[1]
    head_ad = models.head_adapters(mcfg, adapters)  # only these reach the logits
    h_sg, ad_sg = jax.lax.stop_gradient((h, head_ad))

    if not differentiable:
        def loss_only(total, xs):
            h_c, t_c, m_c = xs
            return total + _nll(models.logits(mcfg, params, h_c, ad_sg), t_c, m_c)[1], None

        total, _ = jax.lax.scan(loss_only, jnp.zeros((), jnp.float32), (h_sg, t, m))
        return total, jnp.sum(m)

    def body(carry, xs):
        total, d_ad = carry
        h_c, t_c, m_c = xs
        logits, pull = jax.vjp(lambda x, a: models.logits(mcfg, params, x, a), h_c, ad_sg)
        lse, loss = _nll(logits, t_c, m_c)
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
                   remat: str = "none", chunk: int = 128, differentiable: bool = True,
                   scan_layers: bool = True) -> tuple[Array, Array]:
    """(sum of token losses, number of trained tokens) of one micro-batch.

    `differentiable=False` skips the LM-head gradient the loss otherwise forms in its forward
    pass (for evaluation; the loss itself is the same). `scan_layers=False` unrolls the
    blocks (the same values; compile time then grows with depth)."""
    hidden = models.forward(
        mcfg, base, batch.inputs, adapters=adapters, segment_ids=batch.segment_ids,
        positions=batch.positions, dropout_key=dropout_key, compute_dtype=compute_dtype,
        remat=remat, return_hidden=True, scan_layers=scan_layers,
    )
    return chunked_xent(mcfg, base, adapters, hidden, batch.targets, batch.loss_mask, chunk,
                        differentiable)


def make_train_step(mcfg, tx: optax.GradientTransformation, *, compute_dtype=jnp.float32,
                    remat: str = "none", chunk: int = 128, dropout: bool = True,
                    shardings: Any = None, scan_layers: bool = True):
    """A jitted `step(state, base, batches) -> (state, StepMetrics)`.

    `batches` is a `Batch` whose arrays carry a leading micro-batch axis `[accum, B, T]`.
    The state is donated. A non-finite loss or gradient leaves the state unchanged and
    reports `finite=False` (the caller stops the run). `chunk` tokens' logits exist at a time
    (128 x 49152 float32 = 24 MiB for SmolLM2; 256 costs 44 MiB more peak for ~1% less time).
    `shardings` (a `jaxlora.sharding.StepShardings`) jits the step for a device mesh: the
    state keeps its sharding from step to step and the metrics are replicated.
    `scan_layers=False` unrolls the blocks (`loss_and_count`).
    """

    def micro(adapters, base, batch, key):
        def f(a):
            return loss_and_count(a, base, batch, mcfg=mcfg, dropout_key=key,
                                  compute_dtype=compute_dtype, remat=remat, chunk=chunk,
                                  scan_layers=scan_layers)

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
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state.opt_state, state.adapters)
            adapters = optax.apply_updates(state.adapters, updates)
        new = TrainState(state.step + 1, adapters, opt_state, state.rng)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return new, StepMetrics(loss, count, grad_norm, finite)

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    metrics = jax.sharding.NamedSharding(shardings.batch.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(shardings.state, shardings.base, shardings.batch),
                   out_shardings=(shardings.state, metrics))


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


def evaluate(eval_step, adapters, base, batches: Iterator[data_lib.Batch], max_batches: int,
             place: Callable[[data_lib.Batch], data_lib.Batch] | None = None
             ) -> dict[str, float]:
    """Held-out loss and perplexity over at most `max_batches` batches.

    `place` puts a host batch on the devices (default: `device_batch`; on a mesh, rows split
    over the batch axes)."""
    place = place or device_batch
    total, count = 0.0, 0.0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        ls, c = eval_step(adapters, base, place(batch))
        total += float(ls)
        count += float(c)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(count)}


def device_batch(batch: data_lib.Batch) -> data_lib.Batch:
    """A host batch as device arrays."""
    return data_lib.Batch(*(jnp.asarray(x) for x in batch))


def stack_batches(batches: list[data_lib.Batch]) -> data_lib.Batch:
    """Host micro-batches stacked on a leading axis `[accum, B, T]` (NumPy), the train
    step's batch layout."""
    return data_lib.Batch(*(np.stack(xs) for xs in zip(*batches, strict=True)))
