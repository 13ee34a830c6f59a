"""Training checkpoints: adapters + optimizer state, never the base model.

A run directory holds ``checkpoints/`` managed by Orbax (``ocp.CheckpointManager``):

```
run_dir/checkpoints/
  base.json            the base model by reference: name/path, quant settings, fingerprint
  <step>/state/        the TrainState leaves (adapters, opt_state, step, rng) as a flat dict
  <step>/data/         the data iterator position (a small dict of ints), JSON
  <step>/meta/         leaf manifest (path, shape, dtype, crc32 per leaf), metrics, step
  <step>/metrics/      the step's metrics again, Orbax's own: what keep-best ranks by
```

Modules:

- `jaxlora.checkpoint.base`: the ``base.json`` record, the base fingerprint and the checks
  that refuse adapters of another base.
- `jaxlora.checkpoint.leaves`: a pytree as a flat dict of arrays plus a checksummed manifest.
- `jaxlora.checkpoint.manager`: `CheckpointManager` (Orbax: atomic step directories,
  keep-last-N + keep-best retention, step listing) and the checks Orbax cannot make: every
  leaf against its crc32, the fallback past a damaged newest step (with a warning), the
  rewrite of a damaged step saved again. Asking for a specific damaged step raises
  ``CheckpointError``.
"""

from jaxlora.checkpoint.base import base_record, check_adapters_fit, check_base_record, fingerprint
from jaxlora.checkpoint.manager import CheckpointManager, Restored

__all__ = [
    "CheckpointManager",
    "Restored",
    "base_record",
    "fingerprint",
    "check_base_record",
    "check_adapters_fit",
]
