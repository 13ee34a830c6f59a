"""Beyond one device: meshes, partition rules and the multi-host runtime, on `jax.sharding`.

    spec = ShardingSpec(mesh=(("data", 2), ("fsdp", 4)))      # the [sharding] table
    mesh = sharding.make_mesh(spec)                            # (members, data, fsdp, tensor)
    shardings = sharding.step_shardings(mesh, state, base)     # what the train step is jitted with

`spec` (the config table; no JAX imported), `rules` (meshes, shardings) and `distributed`
(`initialize`: the multi-host runtime, started once before any device is touched), the last
two imported on first use. See `jaxlora.sharding.rules` for what is split over which axis and
`jaxlora.sharding.distributed` for when a run is multi-host.
"""

import importlib
from typing import Any

from jaxlora.sharding.spec import AXES, BATCH_AXES, ShardingSpec, mesh_sizes

_RULES = (
    "WEIGHT_AXES", "StepShardings", "make_mesh", "weight_shards", "batch_shards",
    "base_shardings", "replicated", "batch_sharding", "put_batch", "check_batch",
    "population_rows", "check_population",
    "step_shardings", "device_bytes",
)
_DISTRIBUTED = (
    "ENV_VARS", "AUTO", "named", "distributed_args", "initialize", "is_primary", "gather_hosts",
)
_LAZY = {**dict.fromkeys(_RULES, "rules"), **dict.fromkeys(_DISTRIBUTED, "distributed")}

__all__ = ["AXES", "BATCH_AXES", "ShardingSpec", "mesh_sizes", *_RULES, *_DISTRIBUTED]


def __getattr__(name: str) -> Any:
    if name in _LAZY or name in ("rules", "distributed"):
        module = importlib.import_module(f"jaxlora.sharding.{_LAZY.get(name, name)}")
        return module if name in ("rules", "distributed") else getattr(module, name)
    raise AttributeError(f"module 'jaxlora.sharding' has no attribute {name!r}")
