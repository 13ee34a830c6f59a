"""LoftQ initialization on SmolLM2-135M-Instruct's real weights: error, time and memory.

For T in --iters (default 1 2 4) and plain NF4, each in a fresh subprocess (so its peak RSS
is its own): load the model with `jaxlora.lora.load_loftq` (rank 8, alpha 16, all linear
layers, NF4 + double quant; LoftQ runs per layer while the GGUF is read) or with plain NF4,
time it and read the peak RSS; then load the float weights and report, per layer kind, the
relative error ``||W - (Q + s A B)||_F / ||W||_F`` over all layers of that kind (plain NF4:
``||W - Q||_F / ||W||_F``). Prints a Markdown table and writes --json.

    flock /tmp/cpu.lock nice -n 0 .venv/bin/python benchmarks/bench_loftq.py --json /tmp/loftq.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
import numpy as np
from jaxlora import io, lora, memory, quant
model, iters, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rules = quant.QuantRules(qtype="nf4")
spec = lora.LoraSpec(rank=rank, alpha=2 * rank, init="loftq", loftq_iters=max(iters, 1))
jnp.zeros(1).block_until_ready()  # backend up before timing
t = time.perf_counter()
if iters == 0:
    m, ad = io.load_model(model, quant=rules), {}
else:
    m, ad = lora.load_loftq(model, rules, spec)
jax.block_until_ready((m.params, ad))
seconds, peak = time.perf_counter() - t, memory.peak_rss_mb()
targets = lora.resolve_targets(m.params, spec)
w = lora.flatten_paths(io.load_model(model).params)
q, pairs = lora.flatten_paths(m.params), lora.flatten_paths(ad)
errors = {}
for path in targets:
    ref = np.asarray(w[path], np.float64)
    approx = np.asarray(quant.dequantize(q[path]), np.float64)
    if path in pairs:
        p = pairs[path]
        approx = approx + p.scale * np.einsum("lir,lro->lio", np.asarray(p.a, np.float64),
                                              np.asarray(p.b, np.float64))
    errors[path.split("/")[-2]] = float(np.linalg.norm(ref - approx) / np.linalg.norm(ref))
print(json.dumps({"iters": iters, "seconds": seconds, "peak_rss_mb": peak, "errors": errors}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--iters", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for iters in [0, *args.iters]:  # 0: plain NF4
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(iters), str(args.rank)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    kinds = list(rows[0]["errors"])
    name = lambda it: "plain NF4" if it == 0 else f"LoftQ T={it}"  # noqa: E731
    print("| init | " + " | ".join(kinds) + " | load s | peak RSS MiB |")
    print("|---" * (len(kinds) + 3) + "|")
    for r in rows:
        cells = [f"{r['errors'][k]:.4f}" for k in kinds]
        print(f"| {name(r['iters'])} | " + " | ".join(cells)
              + f" | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
