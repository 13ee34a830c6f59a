"""Populations on SmolLM2-135M (NF4 base): a sweep as one population against one run at a
time, and the step time per member against the population size.

1. Sweep: the same 8-run sweep (rank 4/8/16/32 x standard/rsLoRA, batch 4 x 256) run by
   `jaxlora sweep` twice in this run, with ``--population-size 1`` (one at a time, each run
   loading and compiling on its own) and ``--population-size 8`` (one population). Reported:
   total wall time, the peak RSS of each sweep process, and tokens/s per member.
2. Step time for K = 1, 2, 4, 8, 16 members (r=8, shared batch 4 x 256, remat attn): one
   process per K (so its peak RSS is its own), median of the timed steps.

    .venv/bin/python benchmarks/bench_population.py                 # both parts, 30 steps
    .venv/bin/python benchmarks/bench_population.py --steps 10 --sizes 1,2,4,8
    python3 benchmarks/bench_population.py --parts sizes --sizes 16 --dtype bfloat16  # GPU
        # (--model tiny-llama --batch 1 --seq 32: the GPU suite's dry run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sweep(tmp: Path, steps: int) -> Path:
    (tmp / "base.toml").write_text(f"""\
base = "{REPO / 'experiments' / 'qlora_smollm2.toml'}"
[data]
batch_size = 4
seq_len = 256
[train]
steps = {steps}
progress = false
log_every = 5
[eval]
every = 0
batches = 4
samples = []
[checkpoint]
every = 0
async_save = false
""")
    (tmp / "sweep.toml").write_text('base = "base.toml"\n[grid]\n"lora.rank" = [4, 8, 16, 32]\n'
                                    '"lora.scaling" = ["standard", "rslora"]\n')
    return tmp / "sweep.toml"


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a command run in a child process of its own."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True,
                         text=True)
    wall, peak = out.stdout.split()
    return float(wall), float(peak)


def sweep_part(steps: int) -> None:
    jaxlora = str(Path(sys.executable).with_name("jaxlora"))
    with tempfile.TemporaryDirectory() as tmp:
        sw = _sweep(Path(tmp), steps)
        rows = {}
        for size in (1, 8):
            out = Path(tmp) / f"size{size}"
            wall, peak = _timed([jaxlora, "sweep", str(sw), "--out", str(out),
                                 "--population-size", str(size)])
            summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
            assert len(summaries) == 8, f"population size {size}: {len(summaries)} runs finished"
            tokens = 8 * steps * 4 * 256
            rows[size] = (wall, peak, tokens / wall / 8,
                          sum(s["val_loss"] for s in summaries) / 8)
    print(f"Sweep of 8 QLoRA runs (NF4 SmolLM2-135M, batch 4 x 256, {steps} steps each, "
          f"4 held-out batches before and after), `jaxlora sweep` on {os.cpu_count()} cores\n")
    print("| sweep | wall (s) | peak RSS (MiB) | tokens/s per member | mean held-out loss |")
    print("|---|---|---|---|---|")
    for size, (wall, peak, tps, val) in rows.items():
        label = "one at a time" if size == 1 else f"one population of {size}"
        print(f"| {label} | {wall:.0f} | {peak:.0f} | {tps:.1f} | {val:.4f} |")
    print(f"\npopulation / one at a time: wall {rows[8][0] / rows[1][0]:.2f}, peak RSS "
          f"{rows[8][1] / rows[1][1]:.2f}\n", flush=True)


def _child(k: int, steps: int, layout: str | None, model: str = "smollm2-135m-instruct",
           rows: int = 4, seq: int = 256, dtype: str = "float32") -> dict:
    import jax
    import numpy as np

    from jaxlora import data, memory, optim, population, quant
    from jaxlora import io as jio
    from jaxlora.lora import LoraSpec

    compute = jax.numpy.dtype(dtype)
    m = jio.load_model(model, quant=quant.QuantRules(qtype="nf4"), dtype=compute)
    members = [population.Member(LoraSpec(rank=8, alpha=16.0),
                                 optim.OptimSpec(lr=1e-4 * (i + 1), schedule="constant"), i)
               for i in range(max(k, 1))]
    if k == -1:  # one run alone: the single-run step `jaxlora train` uses
        from jaxlora import lora, train

        tx = optim.make_optimizer(members[0].optim, steps + 1)
        state = train.init_state(lora.init(jax.random.key(0), m.params, members[0].lora), tx, 0)
        single = train.make_train_step(m.config, tx, dropout=False, remat="attn",
                                       compute_dtype=compute)
        step = lambda s, p, b: single(s, p, b)  # noqa: E731
    else:
        state, txs = population.init(m.params, members, steps + 1)
        step = population.make_step(m.config, txs, remat="attn", layout=layout,
                                    compute_dtype=compute)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, m.config.vocab_size, size=(1, rows, seq + 1)).astype(np.int32)
    shape = (1, rows, seq)
    batch = data.Batch(*(jax.numpy.asarray(x) for x in (
        tokens[..., :-1], tokens[..., 1:], np.ones(shape, np.float32), np.ones(shape, np.int32),
        np.broadcast_to(np.arange(seq, dtype=np.int32), shape))))
    state, metrics = step(state, m.params, batch)  # compile + first step
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, m.params, batch)
        float(jax.numpy.ravel(metrics.loss)[0])
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    return {"k": k, "step_s": step_s, "per_member_s": step_s / max(k, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device_peak_mb": memory.device_peak_mb()}


def size_part(sizes: list[int], steps: int, layout: str | None, args) -> None:
    rows = []
    shape = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
             "--dtype", args.dtype]
    for k in [-1, *sizes]:  # -1: a run alone, for comparison
        out = subprocess.run([sys.executable, __file__, "--child", str(k), "--steps",
                              str(steps), *(["--layout", layout] if layout else []), *shape],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done K={k}", file=sys.stderr, flush=True)
    alone = rows.pop(0)
    tokens = args.batch * args.seq
    print(f"Population step ({layout or 'default'} layout), NF4 {args.model}, r=8 all linear, "
          f"shared batch {args.batch} x {args.seq}, {args.dtype}, remat attn, median of "
          f"{steps} steps\n")
    print(f"A run alone (`train.make_train_step`, same settings): step {alone['step_s']:.3f} s, "
          f"device peak {_mb(alone['device_peak_mb'])} MiB\n")
    print("| K | step (s) | per member (s) | tokens/s per member | per member vs a run alone | "
          "peak RSS (MiB) | device peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['per_member_s'] / alone['step_s']:.2f}"
        print(f"| {r['k']} | {r['step_s']:.3f} | {r['per_member_s']:.3f} | "
              f"{tokens / r['per_member_s']:.0f} | {rel} | {r['peak_rss_mb']:.0f} | "
              f"{_mb(r['device_peak_mb'])} |")


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="steps of each sweep run")
    ap.add_argument("--size-steps", type=int, default=2, help="timed steps per K")
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--parts", default="sweep,sizes")
    ap.add_argument("--layout", choices=("rows", "members"), default=None,
                    help="population layout (default: members on CPU, rows on accelerators)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="sizes part: the model")
    ap.add_argument("--batch", type=int, default=4, help="sizes part: rows of the shared batch")
    ap.add_argument("--seq", type=int, default=256, help="sizes part: tokens per row")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="sizes part: compute dtype (and of the float leaves)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.steps, args.layout, args.model, args.batch,
                                args.seq, args.dtype)))
        return
    if "sweep" in args.parts:
        sweep_part(args.steps)
    if "sizes" in args.parts:
        size_part([int(x) for x in args.sizes.split(",")], args.size_steps, args.layout, args)


if __name__ == "__main__":
    main()
