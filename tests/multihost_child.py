"""The processes of tests/test_multihost.py (not collected: the name does not start with test_).

    python tests/multihost_child.py run CONFIG [OVERRIDE ...]
        One host of a multi-host run: `jaxlora.train.run` of the config (the multi-host
        runtime named by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    python tests/multihost_child.py reference CONFIG RUN_DIR OUT_JSON [OVERRIDE ...]
        One process, all 8 devices: the same steps on the same mesh, fed the global batches
        the hosts build (host 0's rows, then host 1's); writes the losses to OUT_JSON and
        checks the adapters of RUN_DIR's last checkpoint against its own.

The parent sets XLA_FLAGS (4 or 8 host devices) and JAX_PLATFORMS=cpu before JAX starts.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np

from jaxlora import data as data_lib
from jaxlora import sharding, train
from jaxlora.config import load_config

HOSTS = 2
RTOL, ATOL = 1e-5, 3e-6  # as tests/multidevice_checks.py: other summation orders


def _global_batches(cfg, loaded):
    """Host 0's rows then host 1's, batch by batch: the global batches of a 2-host run."""
    its = [d.train.iterator() for d in data_lib.host_datasets(cfg.data, loaded.tokenizer, HOSTS)]
    while True:
        parts = [next(it) for it in its]
        yield data_lib.Batch(*(np.concatenate(xs) for xs in zip(*parts, strict=True)))


def reference(config: str, run_dir: str, out: str, overrides: list[str]) -> None:
    cfg = load_config(config, overrides)
    mesh = sharding.make_mesh(cfg.sharding)
    s = train.setup(cfg, mesh)
    step_fn = train.make_train_step(s.loaded.config, s.tx, dropout=False, shardings=s.shardings)
    losses = []
    last = train.train_loop(step_fn, s.state, s.base, _global_batches(cfg, s.loaded),
                            steps=cfg.train.steps,
                            hooks=[lambda info: losses.append(float(info.metrics.loss))],
                            place=functools.partial(sharding.put_batch, s.shardings.batch))
    saved = train.assemble.checkpoint_manager(cfg, run_dir, s).restore(s.state)
    assert saved.step == cfg.train.steps, saved.step
    worst = 0.0
    for x, y in zip(jax.tree.leaves(saved.state.adapters), jax.tree.leaves(last.state.adapters),
                    strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)))))
    Path(out).write_text(json.dumps({"losses": losses, "adapter_max_abs_diff": worst}))


def main(argv: list[str]) -> None:
    mode, config, *rest = argv
    if mode == "run":
        train.run(load_config(config, rest))
    elif mode == "reference":
        reference(config, rest[0], rest[1], rest[2:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
