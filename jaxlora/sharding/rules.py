"""Meshes and partition rules: where each array of a run lives on the devices.

- The frozen base: every weight is split over ``fsdp x tensor`` along one axis. A `QTensor`
  is split along its flattened (row-major) element axis, its packed codes and its block
  scales (and the double-quantized scales, when their 256-block groups divide too) by the
  same contiguous ranges of whole quantization blocks, so no device holds a whole layer and
  no device dequantizes another device's blocks. Float leaves (embeddings, the LM head,
  unquantized kernels) split their first axis past the stacked layer axis that divides;
  norms and biases that divide nothing stay replicated.
- The adapters and the optimizer state: replicated (rank-r factors are small: r=16 over every
  linear layer of a 7B model is 40M parameters).
- Batches ``[accum, B, T]``: rows split over ``data x fsdp``. A population's ``[K*B, T]``
  rows (member-major) over ``members x data x fsdp`` (`population_rows`), so each group of
  devices along ``members`` holds whole members' rows; the base is split as above (or
  replicated where fsdp x tensor = 1) and the members' adapters replicated.

The train step is jitted with these shardings (`StepShardings`), so XLA's SPMD partitioner
inserts the collectives: gathers of the dequantized weight slices for FSDP, reductions over
``tensor`` for the split contractions, and the gradient all-reduce over the batch axes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.errors import ConfigError
from jaxlora.paths import flatten_paths, replace_paths
from jaxlora.quant import QTensor
from jaxlora.sharding.spec import AXES, BATCH_AXES, ShardingSpec, mesh_sizes

__all__ = [
    "WEIGHT_AXES",
    "StepShardings",
    "make_mesh",
    "weight_shards",
    "batch_shards",
    "base_shardings",
    "replicated",
    "batch_sharding",
    "put_batch",
    "check_batch",
    "population_rows",
    "check_population",
    "step_shardings",
    "device_bytes",
]

WEIGHT_AXES = ("fsdp", "tensor")
"""The axes the base's weights are split over."""


class StepShardings(NamedTuple):
    """The shardings a train step is jitted with: its state, the base and the batches."""

    state: Any
    base: Any
    batch: NamedSharding


def make_mesh(spec: ShardingSpec, devices: list | None = None) -> Mesh:
    """The `(members, data, fsdp, tensor)` mesh of `spec` over `devices` (default: every device of
    every process, in JAX's order, grouped by process).

    Grouped by process, each host's devices are one contiguous block of the batch rows, so a
    host's rows are its own slice of the global batch, in process order (`put_batch`).
    """
    if devices is None:  # a stable sort: JAX's order within each process
        devices = sorted(jax.devices(), key=lambda d: d.process_index)
    devices = list(devices)
    sizes = mesh_sizes(spec, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape([sizes[a] for a in AXES]), AXES)


def weight_shards(mesh: Mesh) -> int:
    """How many pieces each base weight is cut into (``fsdp x tensor``)."""
    return mesh.shape["fsdp"] * mesh.shape["tensor"]


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch rows are cut into (``data x fsdp``)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _split(ndim: int, axis: int | None) -> P:
    """A spec splitting `axis` over the weight axes (replicated when `axis` is None)."""
    spec: list[Any] = [None] * ndim
    if axis is not None:
        spec[axis] = WEIGHT_AXES
    return P(*spec)


def _qtensor_sharding(mesh: Mesh, path: str, q: QTensor) -> QTensor:
    n = weight_shards(mesh)
    batch = q.codes.ndim - 1
    blocks = q.absmax.shape[-1]
    if blocks % n:
        raise ConfigError(
            f"sharding.mesh: fsdp x tensor = {n} does not divide the {blocks} quantization "
            f"blocks of {path} (per layer); choose sizes that divide {blocks}")
    split = NamedSharding(mesh, _split(batch + 1, batch))
    nested = None
    if q.nested_absmax is not None:  # split with the blocks when whole 256-groups divide
        groups = q.nested_absmax.shape[-1]
        nested = split if groups % n == 0 else NamedSharding(mesh, P())
    offset = None if q.offset is None else NamedSharding(mesh, P())
    return dataclasses.replace(q, codes=split, absmax=split, nested_absmax=nested, offset=offset)


def base_shardings(mesh: Mesh, base: Mapping[str, Any], stacked: str = r"^layers/") -> dict:
    """A tree of shardings matching `base` (see the module docstring for the rules).

    `stacked` is the regex of the leaves that carry a leading layer axis (never split).

    Raises:
      ConfigError: a quantized layer whose block count the weight axes do not divide.
    """
    n = weight_shards(mesh)
    out = {}
    for path, leaf in flatten_paths(base).items():
        if isinstance(leaf, QTensor):
            out[path] = _qtensor_sharding(mesh, path, leaf)
            continue
        lead = 1 if re.search(stacked, path) else 0
        axis = next((i for i in range(lead, leaf.ndim) if leaf.shape[i] % n == 0), None)
        out[path] = NamedSharding(mesh, _split(leaf.ndim, axis if n > 1 else None))
    return replace_paths(base, out)


def replicated(mesh: Mesh, tree: Any) -> Any:
    """A tree of fully replicated shardings matching `tree` (adapters, optimizer state)."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_sharding(mesh: Mesh, accum: bool = True) -> NamedSharding:
    """Rows of `[accum, B, T]` (or `[B, T]` with ``accum=False``) split over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if accum else P(BATCH_AXES))


def check_batch(mesh: Mesh, batch_size: int) -> None:
    """Raise ConfigError unless data x fsdp and the process count divide the batch size
    (each process assembles batch_size / processes rows)."""
    hosts = jax.process_count()
    if batch_size % hosts:
        raise ConfigError(
            f"data.batch_size: {batch_size} rows cannot be split over {hosts} processes (each "
            f"host assembles its own rows); use a multiple of {hosts}")
    n = batch_shards(mesh)
    if batch_size % n:
        raise ConfigError(
            f"data.batch_size: {batch_size} rows cannot be split over data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {n} devices; use a multiple of {n}")


def population_rows(mesh: Mesh, accum: bool = True) -> NamedSharding:
    """A population's member-major rows, ``[accum, K*B, T]`` (or ``[K*B, T]``), split over
    members x data x fsdp."""
    rows = ("members", *BATCH_AXES)
    return NamedSharding(mesh, P(None, rows) if accum else P(rows))


def check_population(mesh: Mesh, k: int | None) -> None:
    """Raise ConfigError unless the members axis divides `k` members (None: a run alone,
    which has one member: the axis must be 1)."""
    m = mesh.shape["members"]
    if k is None and m > 1:
        raise ConfigError(
            f"sharding.mesh.members = {m}: a members axis splits a population's members "
            "(jaxlora sweep); a run alone has one member")
    if k is not None and k % m:
        raise ConfigError(
            f"sharding.mesh.members = {m} does not divide the population's {k} members; "
            f"use a population size that is a multiple of {m}")


def put_batch(sharding: NamedSharding, batch: Any) -> Any:
    """A host batch (NumPy arrays) as global arrays with `sharding`.

    Each process passes the rows of its own devices (its slice of the global batch); with one
    process that is the whole batch.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def step_shardings(mesh: Mesh, state: Any, base: Any, stacked: str = r"^layers/"
                   ) -> StepShardings:
    """The shardings of a train step on `mesh`: state replicated, base split, batch rows
    split."""
    return StepShardings(replicated(mesh, state), base_shardings(mesh, base, stacked),
                         batch_sharding(mesh))


def device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of `tree`'s arrays that one device holds under `shardings` (a matching tree;
    the largest shard when they differ). Only shapes are read: it works before placing."""
    sizes = jax.tree.map(
        lambda x, sh: int(np.prod(sh.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize,
        tree, shardings)
    return sum(jax.tree.leaves(sizes))
