"""Cost of LoRA (arXiv 2106.09685) and of an NF4 base (QLoRA) on one large linear layer.

Forward + backward of ``y = x @ W (+ s * (x @ A) @ B)`` with ``x [4096, 2048]``,
``W [2048, 2048]``, ``r = 16``: every variant differentiates w.r.t. the input ``x`` (as
inside a network) and the LoRA variants also w.r.t. the adapters ``(A, B)``; ``W`` is frozen.
The four variants are measured side by side in one run (median of ``--repeats`` interleaved
rounds after a warm-up call), and printed as a Markdown table.

Run (CPU):  .venv/bin/python benchmarks/bench_lora.py
Smaller:    .venv/bin/python benchmarks/bench_lora.py --tokens 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlora import lora, quant


def _time_interleaved(cases: dict, repeats: int) -> dict[str, float]:
    """Median seconds per case; the cases take turns in each round so drift in machine
    load hits all of them alike."""
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))  # warm-up: compile + first run
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, args) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=2048)
    p.add_argument("--d-out", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    kx, kw, ka = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (args.tokens, args.d_in), jnp.float32)
    w = jax.random.normal(kw, (args.d_in, args.d_out), jnp.float32) / args.d_in**0.5
    wq = quant.quantize(w, "nf4", 64, double_quant=True)
    a = jax.random.normal(ka, (args.d_in, args.rank), jnp.float32) / args.d_in**0.5
    b = jnp.full((args.rank, args.d_out), 0.01, jnp.float32)

    @jax.jit
    def frozen(x, w):  # d/dx only
        return jax.grad(lambda x: jnp.sum(lora.linear(x, w) ** 2))(x)

    @jax.jit
    def with_lora(x, w, a, b):  # d/dx and d/d(A, B)
        def loss(x, a, b):
            return jnp.sum(lora.linear(x, lora.LoraWeight(w, a, b, scale=2.0)) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(x, a, b)

    r = args.repeats
    t = _time_interleaved(
        {
            "float32 base": (frozen, (x, w)),
            "float32 base + LoRA": (with_lora, (x, w, a, b)),
            "NF4 base": (frozen, (x, wq)),
            "NF4 base + LoRA (QLoRA)": (with_lora, (x, wq, a, b)),
        },
        r,
    )
    flops = 2 * 2 * args.tokens * args.d_in * args.d_out  # forward + grad wrt x

    print(
        f"\nfwd+bwd of x [{args.tokens}, {args.d_in}] @ W [{args.d_in}, {args.d_out}], "
        f"r={args.rank}, {jax.devices()[0].platform.upper()} "
        f"({jax.device_count()} device, median of {r})\n"
    )
    print("| variant | time (ms) | vs float32 base | GFLOP/s (x@W part) |")
    print("|---|---:|---:|---:|")
    base_t = t["float32 base"]
    for name, v in t.items():
        print(f"| {name} | {1e3 * v:.1f} | {v / base_t:.2f}x | {flops / v / 1e9:.1f} |")
    print()
    print(f"LoRA overhead (float32 + LoRA / float32): {t['float32 base + LoRA'] / base_t:.3f}x")
    print(
        "NF4 overhead (QLoRA / float32 + LoRA):     "
        f"{t['NF4 base + LoRA (QLoRA)'] / t['float32 base + LoRA']:.3f}x"
    )
    print(f"NF4 overhead without LoRA (NF4 / float32): {t['NF4 base'] / base_t:.3f}x")


if __name__ == "__main__":
    main()
