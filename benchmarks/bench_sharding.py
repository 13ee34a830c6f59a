"""Per-device memory of SmolLM2-135M (NF4 base, r=8 adapters on all linear layers, AdamW) on
each mesh of the sharding tests, and the train-step time on 8 simulated CPU devices against
one device in the same process.

The bytes are read from the placed arrays (each array's shards on the first device), so they
are what a device holds, not a plan. The step times say what simulating 8 devices on this
machine's cores costs (collectives between threads of one process); they are not a speed
claim for real devices.

    .venv/bin/python benchmarks/bench_sharding.py            # batch 8 x 128, 3 timed steps
    .venv/bin/python benchmarks/bench_sharding.py --seq 256 --steps 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

MESHES = {
    "one device": (("data", 1),),
    "data=8": (("data", 8),),
    "fsdp=8": (("fsdp", 8),),
    "data=2,fsdp=4": (("data", 2), ("fsdp", 4)),
    "fsdp=4,tensor=2": (("fsdp", 4), ("tensor", 2)),
}


def _shard_bytes(tree, device) -> int:
    import jax

    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == device)


def _child(batch: int, seq: int, steps: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlora import data, sharding, train
    from jaxlora.config import Config, ModelSection
    from jaxlora.lora import LoraSpec
    from jaxlora.quant import QuantRules

    cfg = Config(model=ModelSection(name="smollm2-135m-instruct"), quant=QuantRules(qtype="nf4"),
                 lora=LoraSpec(rank=8, alpha=16.0, targets="all-linear"))
    s = train.setup(cfg)  # on the default device; placed on each mesh below
    vocab = s.loaded.config.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(1, batch, seq + 1)).astype(np.int32)
    host = data.Batch(inputs=tokens[..., :-1], targets=tokens[..., 1:],
                      loss_mask=np.ones((1, batch, seq), np.float32),
                      segment_ids=np.ones((1, batch, seq), np.int32),
                      positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)))
    print(f"SmolLM2-135M, NF4 + double quant, r=8 all linear, AdamW; batch {batch} x {seq}, "
          f"float32, median of {steps} steps; {jax.device_count()} simulated CPU devices on "
          f"{os.cpu_count()} cores\n")
    print("| mesh | base / device (MiB) | adapters / device (MiB) | optimizer / device (MiB) "
          "| step (s) |")
    print("|---|---|---|---|---|")
    times = {}
    for name, axes in MESHES.items():
        devices = jax.devices()[:1] if name == "one device" else jax.devices()
        mesh = sharding.make_mesh(sharding.ShardingSpec(mesh=axes), devices)
        sh = sharding.step_shardings(mesh, s.state, s.base)
        base = jax.device_put(s.base, sh.base)
        # a copy: the step donates its state, and on one device device_put would alias it
        state = jax.device_put(jax.tree.map(jnp.copy, s.state), sh.state)
        d0 = mesh.devices.flat[0]
        mib = [_shard_bytes(t, d0) / 2**20 for t in (base, state.adapters, state.opt_state)]
        step_fn = train.make_train_step(s.loaded.config, s.tx, remat="attn", dropout=False,
                                        shardings=sh)
        placed = sharding.put_batch(sh.batch, host)
        compiled = train.compile_step(step_fn, state, base, placed)
        state, m = compiled(state, base, placed)
        float(m.loss)
        ts = []
        for _ in range(steps):
            t = time.perf_counter()
            state, m = compiled(state, base, sharding.put_batch(sh.batch, host))
            float(m.loss)
            ts.append(time.perf_counter() - t)
        times[name] = float(np.median(ts))
        print(f"| {name} | {mib[0]:.1f} | {mib[1]:.2f} | {mib[2]:.2f} | {times[name]:.2f} |",
              flush=True)
        del base, state, compiled, step_fn
        jax.clear_caches()
    slowest = max(v for k, v in times.items() if k != "one device")
    print(f"\nstep time on 8 simulated devices / one device: "
          f"{min(v for k, v in times.items() if k != 'one device') / times['one device']:.2f}"
          f"-{slowest / times['one device']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.batch, args.seq, args.steps)
        return
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, __file__, "--child", "--batch", str(args.batch),
                    "--seq", str(args.seq), "--steps", str(args.steps)], env=env, check=True)


if __name__ == "__main__":
    main()
