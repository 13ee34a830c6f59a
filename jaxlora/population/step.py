"""The population step: K members' adapters, one frozen base, one jitted program.

Member k owns rows ``[k*B, (k+1)*B)`` of the ``[K*B, T]`` batch; the base matmul runs once
over all rows and each row's low-rank path is its member's (`jaxlora.multi`); each member's
loss is normalized by its own tokens and each member has its own optax optimizer, so a
member computes what a run of it alone computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora import data as data_lib
from jaxlora import lora, models, multi, optim
from jaxlora.errors import ConfigError
from jaxlora.train.step import TrainState, chunked_xent, init_state

__all__ = [
    "Member",
    "PopulationState",
    "PopulationMetrics",
    "TrainResult",
    "check_members",
    "init",
    "LAYOUTS",
    "default_layout",
    "make_step",
    "make_eval_step",
    "train",
]

Array = jax.Array


class Member(NamedTuple):
    """One member: its adapter spec, its optimizer and the seed of its init and dropout."""

    lora: lora.LoraSpec
    optim: optim.OptimSpec
    seed: int = 0


class PopulationState(NamedTuple):
    """The K members' train states and which of them are still training."""

    members: tuple[TrainState, ...]
    alive: Array  # bool [K]; False once a member diverged (its state is then frozen)

    @property
    def step(self) -> Array:
        """The population's step (every member's, frozen ones included)."""
        return self.members[0].step


class PopulationMetrics(NamedTuple):
    loss: Array  # [K] mean loss over each member's trained tokens
    tokens: Array  # [K]
    grad_norm: Array  # [K]
    finite: Array  # [K] bool: the member's update was applied


def check_members(base: lora.Params, members: Sequence[Member], mcfg: Any) -> None:
    """Refuse what a population cannot train: no members, PiSSA or LoftQ (they change the
    base), DoRA mixed with other methods or targets (a DoRA leaf's stack holds a magnitude
    for every member), or adapters on the LM head or embeddings (their rows are not
    separable in the loss)."""
    if not members:
        raise ConfigError("population: no members")
    heads = {p.split("/")[0] for p in models.family(mcfg).head_paths(mcfg)}
    for k, m in enumerate(members):
        if m.lora.init in ("pissa", "loftq"):
            raise ConfigError(f"population member {k}: lora.init = {m.lora.init!r} rewrites the "
                              "base, which members share; train it alone")
        if (m.lora.method == "dora") != (members[0].lora.method == "dora") or (
                m.lora.method == "dora"
                and lora.resolve_targets(base, m.lora) != lora.resolve_targets(base, members[0].lora)):
            raise ConfigError(f"population member {k}: lora.method = {m.lora.method!r} beside "
                              f"member 0's {members[0].lora.method!r}; DoRA members share a "
                              "population only with DoRA members of the same targets")
        for path in lora.resolve_targets(base, m.lora):
            if path.split("/")[0] in heads or path.endswith("embedding"):
                raise ConfigError(f"population member {k}: lora.targets adapts {path}; "
                                  "populations adapt linear layers below the head only")


def init(base: lora.Params, members: Sequence[Member], total_steps: int
         ) -> tuple[PopulationState, tuple[optax.GradientTransformation, ...]]:
    """Each member's adapters, optimizer and state exactly as a run of it alone starts."""
    txs = tuple(optim.make_optimizer(m.optim, total_steps) for m in members)
    states = tuple(
        init_state(lora.init(jax.random.key(m.seed), base, m.lora), tx, m.seed)
        for m, tx in zip(members, txs, strict=True))
    return PopulationState(states, jnp.ones(len(members), bool)), txs


def _rows(batch: data_lib.Batch, k: int, shared: bool, sharding: Any = None) -> data_lib.Batch:
    """A `[B*, T]` micro-batch as the `[K*B, T]` rows of the population (tiled if shared),
    laid out by `sharding` (`jaxlora.sharding.population_rows`) on a mesh."""
    rows = jax.tree.map(lambda x: jnp.tile(x, (k, 1)), batch) if shared else batch
    if sharding is not None:
        rows = jax.lax.with_sharding_constraint(rows, sharding)
    return rows


def _member_sums(mcfg, base, adapters: Sequence[lora.Adapters], batch: data_lib.Batch,
                 key: Array | None, *, compute_dtype, remat: str, chunk: int,
                 differentiable: bool = True) -> tuple[Array, Array]:
    """Each member's summed token loss and trained-token count over its rows: [K], [K]."""
    k = len(adapters)
    rows = batch.inputs.shape[0]
    ids = jnp.repeat(jnp.arange(k, dtype=jnp.int32), rows // k)
    params = multi.attach_multi(base, multi.stack_adapters(adapters), ids, key)
    hidden = models.forward(mcfg, params, batch.inputs, segment_ids=batch.segment_ids,
                            positions=batch.positions, compute_dtype=compute_dtype, remat=remat,
                            return_hidden=True)  # [K*B, T, d]
    split = lambda x: x.reshape(k, rows // k, *x.shape[1:])
    # one member's logits chunk at a time (a vmap would hold K chunks of [chunk, vocab])
    return jax.lax.map(lambda x: chunked_xent(mcfg, base, None, *x, chunk, differentiable),
                       (split(hidden), split(batch.targets), split(batch.loss_mask)))


LAYOUTS = ("rows", "members")
"""How a step goes through the members: "rows" runs all members' rows through the model at
once (the base matmul once for all: the fast layout on accelerators, K times the activation
memory); "members" runs one member after another inside the step (the memory of one run, the
compute of K runs: the layout for CPUs, where a bigger matmul is not faster per row)."""


def default_layout(mesh: Any = None) -> str:
    """"members" on CPU, "rows" on GPU and TPU and on a mesh with a members axis."""
    if mesh is not None and mesh.shape["members"] > 1:
        return "rows"
    return "members" if jax.default_backend() == "cpu" else "rows"


def _sums(mcfg, base, params, batch: data_lib.Batch, *, compute_dtype, remat: str, chunk: int,
          differentiable: bool = True) -> tuple[Array, Array]:
    """Summed token loss and token count of `batch` through `params` (adapters attached)."""
    hidden = models.forward(mcfg, params, batch.inputs, segment_ids=batch.segment_ids,
                            positions=batch.positions, compute_dtype=compute_dtype, remat=remat,
                            return_hidden=True)
    return chunked_xent(mcfg, base, None, hidden, batch.targets, batch.loss_mask, chunk,
                        differentiable)


def _grads_by_rows(mcfg, base, adapters, batch, key, k, shared, rows, **kw):
    def f(ads):
        s, c = _member_sums(mcfg, base, ads, _rows(batch, k, shared, rows), key, **kw)
        return jnp.sum(s), (s, c)

    (_, (s, c)), g = jax.value_and_grad(f, has_aux=True)(adapters)
    return s, c, g


def _grads_by_members(mcfg, base, adapters, batch, key, k, shared, rows, **kw):
    """One member after another (a scan), each through the single-adapter path of a run alone
    (`multi.attach_member`: the folded ``x @ (W + s A B)`` and its VJP). Member j's adapter
    is padded to the largest rank for its turn only (a `lax.switch` over the members) and
    its gradient added to its own, unpadded accumulator, so no [K, r_max] stack of the
    adapters or of their gradients is formed. (Members whose dropout rates differ on a leaf
    go through the per-row path over such a stack instead.)"""
    del rows  # one member at a time: its rows are split like a run alone's
    per = batch.inputs.shape[0] // (1 if shared else k)
    template = jax.eval_shape(multi.stack_adapters, adapters)  # shapes and scales only
    per_row = key is not None and not multi.uniform_dropout(template)
    stacked = multi.stack_adapters(adapters) if per_row else template

    def loss(pairs, own, j, sub):
        if per_row:
            ids = jnp.full(own.inputs.shape[0], j, jnp.int32)
            params = multi.attach_multi(base, multi.put_member(stacked, j, pairs), ids, sub)
        else:
            params = multi.attach_member(base, stacked, j, pairs, sub)
        return _sums(mcfg, base, params, own, **kw)

    pad = [lambda i=i: multi.padded_pairs(adapters[i], template) for i in range(k)]

    def add(i):
        return lambda acc, g: tuple(jax.tree.map(jnp.add, a, multi.unpad(g, ad)) if n == i else a
                                    for n, (a, ad) in enumerate(zip(acc, adapters, strict=True)))

    def member(carry, j):
        sums, counts, grads = carry
        own = batch if shared else jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, j * per, per), batch)
        sub = None if key is None else jax.random.fold_in(key, j)
        pairs = jax.lax.switch(j, pad)
        (s, c), g = jax.value_and_grad(loss, has_aux=True)(pairs, own, j, sub)
        grads = jax.lax.switch(j, [add(i) for i in range(k)], grads, g)
        return (sums.at[j].set(s), counts.at[j].set(c), grads), None

    zero = (jnp.zeros(k, jnp.float32), jnp.zeros(k, jnp.float32),
            jax.tree.map(jnp.zeros_like, adapters))
    (s, c, g), _ = jax.lax.scan(member, zero, jnp.arange(k))
    return s, c, g


def make_step(mcfg, txs: Sequence[optax.GradientTransformation], *, shared_data: bool = True,
              compute_dtype: Any = jnp.float32, remat: str = "none", chunk: int = 128,
              dropout: bool = False, layout: str | None = None, mesh: Any = None) -> Callable:
    """A jitted `step(state, base, batches) -> (state, PopulationMetrics)`, state donated.

    `batches` carries a micro-batch axis: `[accum, B, T]` when `shared_data` (every member
    gets those rows), else `[accum, K*B, T]` (member k's rows at `[k*B, (k+1)*B)`). Gradients
    and losses are accumulated per member and divided by the member's own token count, as
    `train.make_train_step` does for one run. `layout`: see `LAYOUTS` (default:
    `default_layout(mesh)`). On a `mesh` (`jaxlora.sharding.make_mesh`; the base and state
    placed on it by the caller) the "rows" layout splits the population's rows over members x
    data x fsdp, so each group along ``members`` trains its own members.
    """
    k = len(txs)
    layout = layout or default_layout(mesh)
    if layout not in LAYOUTS:
        raise ValueError(f"population layout must be one of {LAYOUTS}, got {layout!r}")
    from jaxlora import sharding

    rows = None
    if mesh is not None:
        sharding.check_population(mesh, k)
        if layout == "members" and mesh.shape["members"] > 1:
            raise ConfigError("sharding.mesh.members > 1 needs the 'rows' population layout "
                              "(the 'members' layout trains one member after another)")
        rows = sharding.population_rows(mesh, accum=False)
    grads_of = _grads_by_rows if layout == "rows" else _grads_by_members

    def step(state: PopulationState, base, batches: data_lib.Batch):
        accum = batches.inputs.shape[0]
        adapters = tuple(m.adapters for m in state.members)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.members[0].rng),
                                 state.members[0].step)

        def body(carry, xs):
            sums, counts, grads = carry
            batch, i = xs
            sub = jax.random.fold_in(key, i) if dropout else None
            s, c, g = grads_of(mcfg, base, adapters, batch, sub, k, shared_data, rows,
                               compute_dtype=compute_dtype, remat=remat, chunk=chunk)
            return (sums + s, counts + c, jax.tree.map(jnp.add, grads, g)), None

        zero = (jnp.zeros(k, jnp.float32), jnp.zeros(k, jnp.float32),
                jax.tree.map(jnp.zeros_like, adapters))
        (sums, counts, grads), _ = jax.lax.scan(body, zero, (batches, jnp.arange(accum)))
        denom = jnp.maximum(counts, 1.0)
        new, norms, finite = [], [], []
        for j, (tx, member, g) in enumerate(zip(txs, state.members, grads, strict=True)):
            g = jax.tree.map(lambda x, d=denom[j]: x / d, g)
            norm = optax.tree.norm(g)
            ok = state.alive[j] & jnp.isfinite(sums[j]) & jnp.isfinite(norm)
            updates, opt_state = tx.update(g, member.opt_state, member.adapters)
            moved = TrainState(member.step + 1, optax.apply_updates(member.adapters, updates),
                               opt_state, member.rng)
            frozen = member._replace(step=member.step + 1)  # the step counts on, nothing moves
            new.append(jax.tree.map(lambda a, b, ok=ok: jnp.where(ok, a, b), moved, frozen))
            norms.append(norm)
            finite.append(ok)
        finite = jnp.stack(finite)
        metrics = PopulationMetrics(sums / denom, counts, jnp.stack(norms), finite)
        out = PopulationState(tuple(new), state.alive & finite)
        if mesh is not None:  # the state stays replicated from step to step
            out = jax.lax.with_sharding_constraint(out, sharding.replicated(mesh, out))
        return out, metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(mcfg, k: int, *, shared: bool = True, compute_dtype: Any = jnp.float32,
                   chunk: int = 256, mesh: Any = None, layout: str | None = None) -> Callable:
    """A jitted `eval(adapters_tuple, base, batch) -> (loss sums [K], counts [K])`: every
    member on the same held-out rows `[B, T]` (`shared`), or each on its own `[K*B, T]`.
    `layout` as for `make_step`: all members' rows at once (on a `mesh`, split as
    `make_step` splits them), or one member after another through its own folded path."""
    from jaxlora import sharding

    layout = layout or default_layout(mesh)
    rows = None if mesh is None else sharding.population_rows(mesh, accum=False)
    kw = dict(compute_dtype=compute_dtype, remat="none", chunk=chunk, differentiable=False)

    def by_rows(adapters, base, batch):
        return _member_sums(mcfg, base, adapters, _rows(batch, k, shared, rows), None, **kw)

    def by_members(adapters, base, batch):
        template = jax.eval_shape(multi.stack_adapters, adapters)
        pad = [lambda i=i: multi.padded_pairs(adapters[i], template) for i in range(k)]
        per = batch.inputs.shape[0] // (1 if shared else k)

        def one(j):
            own = batch if shared else jax.tree.map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, j * per, per), batch)
            params = multi.attach_member(base, template, j, jax.lax.switch(j, pad))
            return _sums(mcfg, base, params, own, **kw)

        return jax.lax.map(one, jnp.arange(k))

    return jax.jit(by_rows if layout == "rows" else by_members)


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state, per-step losses [steps, K], divergence flags
    and, when `train` was given held-out batches, the held-out mean loss of every member
    [evals, K] at `val_steps` [evals] (step 0: the base, before any update)."""

    state: PopulationState
    losses: np.ndarray
    diverged: np.ndarray
    val_steps: np.ndarray  # [evals] int; empty without held-out batches
    val_losses: np.ndarray  # [evals, K]

    @property
    def adapters(self) -> list[lora.Adapters]:
        return [m.adapters for m in self.state.members]


def _held_out(mcfg, base, k: int, batches: Sequence[data_lib.Batch], compute_dtype: Any,
              layout: str | None) -> Callable[[tuple], np.ndarray] | None:
    """`loss(adapters_tuple) -> [K]`: each member's mean token loss over all of `batches`
    (None without batches)."""
    if not batches:
        return None
    eval_fn = make_eval_step(mcfg, k, compute_dtype=compute_dtype, layout=layout)
    rows = [data_lib.Batch(*(jnp.asarray(x) for x in b)) for b in batches]

    def loss(adapters: tuple) -> np.ndarray:
        sums, counts = np.zeros(k), np.zeros(k)
        for b in rows:
            s, c = eval_fn(adapters, base, b)
            sums, counts = sums + np.asarray(s), counts + np.asarray(c)
        return sums / np.maximum(counts, 1.0)

    return loss


def train(mcfg, base: lora.Params, members: Sequence[Member], batches: Iterator[data_lib.Batch],
          *, steps: int, compute_dtype: Any = jnp.float32, remat: str = "none",
          layout: str | None = None,
          on_step: Callable[[int, PopulationMetrics], None] | None = None,
          eval_batches: Sequence[data_lib.Batch] = (), eval_every: int = 0) -> TrainResult:
    """Train `members` over `base` for `steps` steps on shared `batches` (from a notebook).

    `batches` yields host `Batch`es `[B, T]` (e.g. `Dataset.iterator()`); `on_step(step,
    metrics)` is called after each step (a progress bar, a plot). With `eval_batches`
    (host `Batch`es `[B, T]`, the same rows for every member), each member's held-out loss
    (summed over all of them, divided by their tokens) is measured before training, every
    `eval_every` steps (0: only then and at the end) and after the last step: a held-out
    loss curve per member, in `TrainResult.val_losses`.
    """
    check_members(base, members, mcfg)
    state, txs = init(base, members, steps)
    dropout = any(m.lora.dropout > 0 for m in members)
    step_fn = make_step(mcfg, txs, compute_dtype=compute_dtype, remat=remat, dropout=dropout,
                        layout=layout)
    evaluate = _held_out(mcfg, base, len(members), eval_batches, compute_dtype, layout)
    val_steps, val_losses = [], []

    def measure(i: int, state: PopulationState) -> None:
        if evaluate is not None:
            val_steps.append(i)
            val_losses.append(evaluate(tuple(m.adapters for m in state.members)))

    measure(0, state)
    losses = []
    for i in range(steps):
        b = next(batches)
        batch = data_lib.Batch(*(jnp.asarray(x)[None] for x in b))
        state, m = step_fn(state, base, batch)
        losses.append(np.asarray(m.loss))
        if on_step is not None:
            on_step(i + 1, m)
        if i + 1 == steps or (eval_every and (i + 1) % eval_every == 0):
            measure(i + 1, state)
    k = len(members)
    return TrainResult(state, np.stack(losses), ~np.asarray(state.alive),
                       np.asarray(val_steps, int), np.asarray(val_losses).reshape(-1, k))

