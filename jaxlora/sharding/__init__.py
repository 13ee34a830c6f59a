"""Beyond one device: meshes, partition rules and the multi-host runtime, on `jax.sharding`.

    spec = ShardingSpec(mesh=(("data", 2), ("fsdp", 4)))      # the [sharding] table
    mesh = sharding.make_mesh(spec)                            # (data, fsdp, tensor)
    shardings = sharding.step_shardings(mesh, state, base)     # what the train step is jitted with

`spec` (the config table; no JAX imported) and `rules` (meshes, shardings; imported on first
use). See `jaxlora.sharding.rules` for what is split over which axis.
"""

import importlib
from typing import Any

from jaxlora.sharding.spec import AXES, BATCH_AXES, ShardingSpec, mesh_sizes

_RULES = (
    "WEIGHT_AXES", "StepShardings", "make_mesh", "weight_shards", "batch_shards",
    "base_shardings", "replicated", "batch_sharding", "put_batch", "check_batch",
    "step_shardings", "device_bytes",
)

__all__ = ["AXES", "BATCH_AXES", "ShardingSpec", "mesh_sizes", *_RULES]


def __getattr__(name: str) -> Any:
    if name in _RULES or name == "rules":
        rules = importlib.import_module("jaxlora.sharding.rules")
        return rules if name == "rules" else getattr(rules, name)
    raise AttributeError(f"module 'jaxlora.sharding' has no attribute {name!r}")
