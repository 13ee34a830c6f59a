"""Load time and peak host memory of `jaxlora.io.load_model` for SmolLM2-135M-Instruct.

Each variant runs in a fresh subprocess (so peak RSS is its own). Prints a Markdown table.

    .venv/bin/python benchmarks/bench_load.py [--model smollm2-135m-instruct] [--repeats 3]

Columns: wall time of `load_model` (median of repeats, after `import jax` and jaxlora),
peak RSS of the process (ru_maxrss), RSS right after the imports, and the bytes of the
returned parameter tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp
import numpy as np
import jaxlora.io as io
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
model, variant = sys.argv[1], sys.argv[2]
jax.numpy.zeros(1).block_until_ready()  # backend up before timing
base = rss_mb()
kw = {"float32": {}, "bfloat16": {"dtype": jnp.bfloat16}}.get(variant)
if kw is None:
    from jaxlora.quant import QuantRules
    kw = {"quant": QuantRules(qtype=variant)}
t = time.perf_counter()
m = io.load_model(model, **kw)
jax.block_until_ready(jax.tree.leaves(m.params))
dt = time.perf_counter() - t
nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(m.params))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": dt, "peak_rss_mb": peak, "base_rss_mb": base, "final_rss_mb": rss_mb(), "params_mb": nbytes / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variants", default="float32,bfloat16,nf4,int8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    rows = []
    for variant in args.variants.split(","):
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, args.model, variant], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"{variant}: child failed:\n{out.stderr[-2000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        def med(k: str, runs: list[dict] = runs) -> float:
            return statistics.median(r[k] for r in runs)

        rows.append((variant, med("load_s"), min(r["load_s"] for r in runs), med("peak_rss_mb"),
                     med("base_rss_mb"), med("final_rss_mb"), med("params_mb")))
    print(f"load_model({args.model!r}), {args.repeats} fresh processes per row, CPU, {os.cpu_count()} cores\n")
    print("| variant | load s (median) | load s (min) | peak RSS MB | RSS after imports MB | RSS after load MB | params MB |")
    print("|---|---|---|---|---|---|---|")
    for v, med_s, min_s, peak, base, final, pmb in rows:
        print(f"| {v} | {med_s:.2f} | {min_s:.2f} | {peak:.0f} | {base:.0f} | {final:.0f} | {pmb:.0f} |")


if __name__ == "__main__":
    main()
