"""The `[sharding]` table: the device mesh and the multi-host runtime (no JAX imported here).

The mesh has four named axes, each of a size that the config gives (or -1: the devices that
are left):

- ``members``: a population's members are split over it (`jaxlora.population`): each group
  of devices along it trains K / members of them on their own rows; 1 outside populations.
- ``data``: batch rows are split over it; parameters are replicated along it.
- ``fsdp``: batch rows are split over it too, and so are the frozen base's weights (each
  device stores 1/fsdp of every layer: of a QTensor's packed codes and block scales alike),
  as in fully sharded data parallelism (ZeRO-3).
- ``tensor``: each layer's weights are split over it as well (together with fsdp, on block
  boundaries), while the rows are not, so the devices of a tensor group share one slice of
  the batch and split each layer's matmul (Megatron-style row-parallel).

The multi-host fields start `jax.distributed` (one process per host, every host running the
same command); left empty they come from the environment (the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, or the cluster as `jax.distributed.initialize`
detects it: SLURM, TPU pods). When the runtime starts: `jaxlora.sharding.distributed`.
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxlora.errors import ConfigError
from jaxlora.schema import field

__all__ = ["AXES", "BATCH_AXES", "ShardingSpec", "mesh_sizes"]

AXES = ("members", "data", "fsdp", "tensor")
"""The mesh axes, in the mesh's order."""
BATCH_AXES = ("data", "fsdp")
"""The axes batch rows are split over."""


def _mesh_check(mesh: tuple[tuple[str, int], ...]) -> str | None:
    if not mesh:
        return "needs at least one axis, e.g. {data = -1}"
    for axis, size in mesh:
        if axis not in AXES:
            return f"unknown axis {axis!r}: the axes are {', '.join(AXES)}"
        if size != -1 and size < 1:
            return f"axis {axis!r} has size {size}; sizes are >= 1, or -1 for 'the rest'"
    if len({a for a, _ in mesh}) != len(mesh):
        return "an axis is named twice"
    if sum(size == -1 for _, size in mesh) > 1:
        return "at most one axis may have size -1"
    return None


def _address_check(address: str) -> str | None:
    if address and address != "auto" and not re.fullmatch(r"[^\s:]+:\d+", address):
        return f"{address!r} is not host:port (or \"auto\")"
    return None


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
    """Device mesh and multi-host runtime of a run (the `[sharding]` table)."""

    mesh: tuple[tuple[str, int], ...] = field(
        (("data", -1),),
        "Table axis -> size over members (populations only), data, fsdp, tensor; -1 takes "
        "the remaining devices (absent axes have size 1).",
        check=_mesh_check,
    )
    coordinator_address: str = field(
        "", "Multi-host: host:port of process 0; \"auto\": detected from the cluster (SLURM, "
        "TPU pod); empty: from the environment, or one host.",
        check=_address_check,
    )
    num_processes: int = field(
        0, "Multi-host: number of processes (0: from the environment, or 1).", ge=0
    )
    process_id: int = field(
        -1, "Multi-host: this process's index (-1: from the environment).", ge=-1
    )
    heartbeat_timeout_s: int = field(
        100, "Multi-host: seconds without a heartbeat after which a process counts as dead "
        "and the others exit with an error.", ge=1
    )

    def __post_init__(self):
        mesh = self.mesh.items() if isinstance(self.mesh, dict) else self.mesh
        object.__setattr__(self, "mesh", tuple((str(a), int(s)) for a, s in mesh))
        err = _mesh_check(self.mesh)
        if err:
            raise ValueError(f"ShardingSpec.mesh: {err}")

    @property
    def multi_host(self) -> bool:
        """Whether the config itself names a multi-host runtime."""
        return bool(self.coordinator_address) or self.num_processes > 1


def mesh_sizes(spec: ShardingSpec, n_devices: int) -> dict[str, int]:
    """The size of every axis of `AXES` on `n_devices` devices (-1 resolved, absent = 1).

    Raises:
      ConfigError: the sizes do not multiply to the device count (naming both).
    """
    sizes = {a: 1 for a in AXES}
    sizes.update(dict(spec.mesh))
    fixed = math.prod(s for s in sizes.values() if s != -1)
    free = [a for a, s in sizes.items() if s == -1]
    shown = ", ".join(f"{a}={s}" for a, s in spec.mesh)
    if free:
        if n_devices % fixed:
            raise ConfigError(f"sharding.mesh: {{{shown}}} does not divide the {n_devices} "
                              f"devices (the fixed axes take {fixed})")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"sharding.mesh: {{{shown}}} needs {fixed} devices, but there are "
                          f"{n_devices}")
    return sizes
