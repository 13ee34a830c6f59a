"""Benchmark jaxlora.quant (QLoRA NF4 / double quant, Dettmers et al. 2023, arXiv 2305.14314).

Measures, on the default JAX backend (CPU here):
  1. quantize / dequantize throughput of a 4096 x 4096 float32 matrix, per qtype;
  2. time and stored bytes to quantize every linear weight of SmolLM2-135M (a random float32
     stand-in with the exact shapes: 30 layers of q/o [576,576], k/v [576,192],
     gate/up [576,1536], down [1536,576], stacked per projection as [30, in, out]);
  3. the cost of dequantize + matmul relative to a float matmul inside one jitted program.

Prints a Markdown table. Run:

    .venv/bin/python benchmarks/bench_quant.py            # full
    .venv/bin/python benchmarks/bench_quant.py --quick    # smaller repeats
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant import QuantRules, dequantize, quantize, quantize_tree

SMOLLM2_135M = {  # name: (in, out); 30 layers, d=576, 9 q heads / 3 kv heads of 64, ffn 1536
    "attn/q_proj": (576, 576),
    "attn/k_proj": (576, 192),
    "attn/v_proj": (576, 192),
    "attn/o_proj": (576, 576),
    "mlp/gate_proj": (576, 1536),
    "mlp/up_proj": (576, 1536),
    "mlp/down_proj": (1536, 576),
}
N_LAYERS = 30


def timeit(fn, *args, repeats: int = 5) -> float:
    """Median wall seconds of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_throughput(repeats: int) -> list[str]:
    x = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
    rows = []
    for qtype, dq in (
        ("nf4", True),
        ("nf4", False),
        ("fp4", True),
        ("int4", False),
        ("int8", False),
    ):
        qf = jax.jit(lambda a, t=qtype, d=dq: quantize(a, t, 64, d))
        q = qf(x)
        df = jax.jit(dequantize)
        tq, td = timeit(qf, x, repeats=repeats), timeit(df, q, repeats=repeats)
        rows.append(
            f"| {qtype}{'+DQ' if dq else ''} | {tq * 1e3:.1f} | "
            f"{x.size / tq / 1e6:.0f} | {td * 1e3:.1f} | {x.size / td / 1e6:.0f} | "
            f"{8 * q.nbytes / q.size:.3f} |"
        )
    return [
        "### quantize / dequantize, 4096 x 4096 float32 (block 64)",
        "",
        "| qtype | quantize ms | Mparam/s | dequantize ms | Mparam/s | bits/param |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def bench_smollm2() -> list[str]:
    key = jax.random.key(1)
    params: dict = {"layers": {}}
    for i, (name, (din, dout)) in enumerate(SMOLLM2_135M.items()):
        group, proj = name.split("/")
        w = jax.random.normal(jax.random.fold_in(key, i), (N_LAYERS, din, dout)) * 0.02
        params["layers"].setdefault(group, {})[proj] = {"kernel": w}
    jax.block_until_ready(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    for rules in (
        QuantRules("nf4", 64, True),
        QuantRules("nf4", 64, False),
        QuantRules("int8", 64, False),
    ):
        quantize_tree(params, rules)  # warm-up: compile each shape once
        t0 = time.perf_counter()
        qp, rep = quantize_tree(params, rules)
        jax.block_until_ready(qp)
        dt = time.perf_counter() - t0
        rows.append(
            f"| {rules.qtype}{'+DQ' if rules.double_quant else ''} | {n / 1e6:.2f} | "
            f"{4 * n / 2**20:.1f} | {rep.quantized_bytes / 2**20:.2f} | "
            f"{rep.quantized_bits_per_param:.3f} | {dt:.2f} |"
        )
    return [
        "### SmolLM2-135M linear weights (random stand-in, 30 x 7 kernels, stacked)",
        "",
        "| qtype | params (M) | float32 MiB | stored MiB | bits/param | quantize s (warm) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def bench_matmul(repeats: int) -> list[str]:
    rows = []
    for m, k, n in ((1024, 576, 1536), (1024, 4096, 4096)):
        kx, kw = jax.random.split(jax.random.key(2))
        x = jax.random.normal(kx, (m, k), jnp.float32)
        w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
        q = quantize(w, "nf4", 64, True)
        f_float = jax.jit(lambda a, b: a @ b)
        f_q = jax.jit(lambda a, b: a @ dequantize(b))
        t_f, t_q = timeit(f_float, x, w, repeats=repeats), timeit(f_q, x, q, repeats=repeats)
        rows.append(
            f"| [{m},{k}] x [{k},{n}] | {t_f * 1e3:.2f} | {t_q * 1e3:.2f} | {t_q / t_f:.2f} |"
        )
    return [
        "### dequantize(nf4+DQ) + matmul vs float32 matmul, inside jit",
        "",
        "| shape | float ms | nf4 dequant+matmul ms | ratio |",
        "|---|---:|---:|---:|",
        *rows,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    repeats = 2 if args.quick else 5
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}\n")
    for block in (bench_throughput(repeats), bench_smollm2(), bench_matmul(repeats)):
        print("\n".join(block) + "\n")


if __name__ == "__main__":
    main()
