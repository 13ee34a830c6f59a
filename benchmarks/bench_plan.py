"""The memory planner against measured peak RSS: SmolLM2-135M over LoRA / QLoRA, every remat
policy and batch shapes 1 x 256 to 8 x 512, and tiny-llama (the runtime's fixed cost).

Each point runs in a fresh process what `jaxlora train` runs before and during its steps:
`train.assemble.setup` of the point's config (the streaming load, quantized on load for
QLoRA; adapters r=8 on all linear layers; AdamW state), the train step compiled ahead of time
(`train.compile_step`) and two steps on a random token batch. Measured: the process's peak
RSS (ru_maxrss) and XLA's buffer assignment of the compiled step (arguments, temporaries).
Predicted: `jaxlora.plan.plan(cfg)`, computed here before the child starts. Prints a Markdown
table (and `--json FILE` writes the rows).

    flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_plan.py            # the covering grid
    .venv/bin/python benchmarks/bench_plan.py --points qlora:attn:4x256,lora:none:1x256
    .venv/bin/python benchmarks/bench_plan.py --scale scale.json   # + the 7B row of bench_scale.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SMOLLM2 = "smollm2-135m-instruct"
# A covering subset of {lora, qlora} x {none, dots, attn, full} x {1x256 .. 8x512}: every
# variant with every policy, every policy at the largest shape, both variants at both ends.
POINTS = (
    "tiny:attn:2x32",
    "qlora:none:1x256", "qlora:none:4x256", "qlora:none:8x512",
    "qlora:dots:4x256", "qlora:dots:8x512",
    "qlora:attn:1x256", "qlora:attn:4x256", "qlora:attn:8x512",
    "qlora:full:4x256", "qlora:full:8x512",
    "lora:none:1x256", "lora:none:4x256",
    "lora:dots:8x512", "lora:attn:4x256", "lora:attn:8x512", "lora:full:1x256",
)


def point_config(point: str):
    """The run config of a point `variant:remat:BxT` (variant lora, qlora or tiny)."""
    from jaxlora import config

    variant, remat, shape = point.split(":")
    b, t = (int(x) for x in shape.split("x"))
    return config.config_from_dict({
        "name": point.replace(":", "-"),
        "model": {"name": "tiny-llama" if variant == "tiny" else SMOLLM2, "remat": remat},
        "quant": {"qtype": "none" if variant == "lora" else "nf4"},
        "lora": {"rank": 8, "alpha": 16.0, "targets": "all-linear"},
        "data": {"batch_size": b, "seq_len": t},
        "train": {"steps": 2},
    })


def _child(point: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlora import data, memory, train
    from jaxlora.train.assemble import compute_dtype, setup

    cfg = point_config(point)
    s = setup(cfg)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(
        0, s.loaded.config.vocab_size, (1, b, t + 1), np.int32)
    batch = data.Batch(inputs=jnp.asarray(tokens[..., :-1]), targets=jnp.asarray(tokens[..., 1:]),
                       loss_mask=jnp.ones((1, b, t), jnp.float32),
                       segment_ids=jnp.ones((1, b, t), jnp.int32),
                       positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)))
    load_peak = memory.peak_rss_mb()
    step_fn = train.make_train_step(s.loaded.config, s.tx,
                                    compute_dtype=compute_dtype(cfg.model.compute_dtype),
                                    remat=cfg.model.remat, dropout=False)
    compiled = train.compile_step(step_fn, s.state, s.base, batch)
    ma = compiled.memory_analysis()
    state = s.state
    for _ in range(2):
        state, m = compiled(state, s.base, batch)
        float(m.loss)
    nbytes = lambda tree: sum(int(x.nbytes) for x in jax.tree.leaves(tree))
    return {"peak_rss_mb": memory.peak_rss_mb(), "load_peak_rss_mb": load_peak,
            "xla_argument_mb": ma.argument_size_in_bytes / 2**20,
            "xla_temp_mb": ma.temp_size_in_bytes / 2**20,
            "base_mb": nbytes(s.base) / 2**20, "adapters_mb": nbytes(state.adapters) / 2**20,
            "optimizer_mb": nbytes(state.opt_state) / 2**20}


def measure(point: str) -> dict:
    """One point in a fresh process, beside the plan of its config."""
    from jaxlora import plan

    p = plan.plan(point_config(point), platform="cpu", devices=1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", point], check=True,
                         capture_output=True, text=True, env=env)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(point=point, predicted_mb=p.peak / 2**20, predicted_step_mb=p.step / 2**20,
               predicted_load_mb=p.load_peak / 2**20, predicted_compile_mb=p.compile_peak / 2**20,
               predicted_temp_mb=(p.gradients + p.activations + p.layer + p.logits) / 2**20)
    row["error"] = row["predicted_mb"] / row["peak_rss_mb"] - 1
    return row


def table(rows: list[dict]) -> str:
    out = ["| point (variant:remat:BxT) | predicted peak MiB | measured peak RSS MiB | error | "
           "XLA temp MiB (predicted / compiled) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        temp = (f"{r['predicted_temp_mb']:.0f} / {r['xla_temp_mb']:.0f}"
                if "xla_temp_mb" in r else "-")
        out.append(f"| {r['point']} | {r['predicted_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                   f"{100 * r['error']:+.1f}% | {temp} |")
    return "\n".join(out)


def scale_row(path: str) -> dict:
    """The 7B row: bench_scale.py's measured figures beside the plan of its run."""
    import dataclasses

    from jaxlora import config, plan
    from jaxlora.models import ModelConfig

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_scale import LLAMA_7B

    with open(path) as f:
        r = json.load(f)
    cfg = config.config_from_dict({
        "model": {"name": "tiny-llama", "remat": r["remat"]},  # the shapes come from mcfg
        "quant": {"qtype": "nf4", "double_quant": True},
        "lora": {"rank": r["rank"], "alpha": 2.0 * r["rank"], "targets": "all-linear"},
        "data": {"batch_size": r["batch"], "seq_len": r["seq"]}})
    p = plan.plan(cfg, mcfg=dataclasses.replace(ModelConfig(**LLAMA_7B)), platform="cpu",
                  devices=1)
    measured = max(r["load_peak_rss_mb"], r["train_peak_rss_mb"])
    return {"point": f"7B-shaped qlora:{r['remat']}:{r['batch']}x{r['seq']} r={r['rank']}",
            "predicted_mb": p.peak / 2**20, "peak_rss_mb": measured,
            "error": p.peak / 2**20 / measured - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--scale", metavar="JSON", help="bench_scale.py's result line: add the 7B row")
    ap.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child)))
        return
    rows = []
    for point in args.points.split(","):
        rows.append(measure(point))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.scale:
        rows.append(scale_row(args.scale))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
