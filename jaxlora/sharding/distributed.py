"""The multi-host runtime: `jax.distributed.initialize` from the `[sharding]` table or the
environment, once, before any device is touched.

A run is multi-host when something names it, and only then is the runtime started (a plain
one-host run never waits for peers):

- the config: ``sharding.coordinator_address`` (``host:port`` of process 0, or ``"auto"``)
  or ``sharding.num_processes > 1``;
- the environment: any of ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``.

Each of the three values comes from its config field when set, else from its variable, else
JAX detects it from the cluster (`jax.distributed.initialize` with the argument left out:
SLURM under ``srun``, Cloud TPU pod slices, Open MPI). ``coordinator_address = "auto"`` asks
for exactly that detection with nothing else given. Every host runs the same command; the
process id is the one value that differs, so it comes from the environment or the cluster.

A process that stops sending heartbeats for ``sharding.heartbeat_timeout_s`` seconds counts
as dead: the coordination service then fails every other process with an error, so a lost
host ends the job instead of hanging it. On CPU the cross-process collectives are gloo's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from jaxlora.errors import ConfigError
from jaxlora.sharding.spec import ShardingSpec

__all__ = ["ENV_VARS", "AUTO", "named", "distributed_args", "initialize", "is_primary",
           "gather_hosts"]

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
"""The variables that name a multi-host run (address, process count, this process's id)."""
AUTO = "auto"
"""``coordinator_address`` value: let JAX detect the cluster (SLURM, TPU pod, Open MPI)."""


def named(spec: ShardingSpec, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the config or the environment names a multi-host run."""
    environ = os.environ if environ is None else environ
    return spec.multi_host or any(environ.get(v) for v in ENV_VARS)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not an integer") from None


def distributed_args(spec: ShardingSpec, environ: Mapping[str, str] | None = None) -> dict:
    """The keyword arguments of `jax.distributed.initialize` for `spec` (None: detected by
    JAX from the cluster)."""
    environ = os.environ if environ is None else environ
    address = spec.coordinator_address
    if address in ("", AUTO):
        address = None if address == AUTO else environ.get(ENV_VARS[0]) or None
    return {
        "coordinator_address": address,
        "num_processes": spec.num_processes or _env_int(environ, ENV_VARS[1]),
        "process_id": spec.process_id if spec.process_id >= 0 else _env_int(environ, ENV_VARS[2]),
        "heartbeat_timeout_seconds": spec.heartbeat_timeout_s,
    }


def initialize(spec: ShardingSpec, environ: Mapping[str, str] | None = None) -> bool:
    """Start `jax.distributed` when a multi-host run is named (see the module docstring).

    Returns whether this process runs multi-host. Idempotent: a second call (a sweep of
    runs) finds the runtime started and returns True.

    Raises:
      ConfigError: a value is missing (neither the config, the environment nor a detected
        cluster gives it) or the devices were used before.
    """
    if jax.distributed.is_initialized():
        return True
    if not named(spec, environ):
        return False
    if jax.config.jax_cpu_collectives_implementation is None:  # CPU hosts talk through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    args = distributed_args(spec, environ)
    try:
        jax.distributed.initialize(**args)
    except (ValueError, TypeError, RuntimeError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
        raise ConfigError(
            f"sharding: cannot start the multi-host runtime ({shown}): {e}. Set "
            f"sharding.coordinator_address / num_processes (or {', '.join(ENV_VARS)}) on every "
            f"host, or launch under a cluster JAX detects (srun, a TPU pod slice)") from e
    return True


def is_primary() -> bool:
    """Whether this is process 0: the one that writes run files and logs."""
    return jax.process_index() == 0


def gather_hosts(values: np.ndarray) -> np.ndarray:
    """Every process's `values` (the same shape on each), stacked in process order: [P, ...].

    A collective: every process calls it at the same point (e.g. `jaxlora.data.load_datasets`
    sharing the hosts' batch counts). One process: `values[None]`, without touching JAX.
    """
    if jax.process_count() == 1:
        return np.asarray(values)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))
