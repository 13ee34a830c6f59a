"""Where a training step's time goes: a per-op profile of one compiled step, by model part.

Builds the step of `bench_train.py` (same variants, batch, rank, remat), times a few steps,
then traces one with `jax.profiler` and reads back the trace that XLA's CPU (or GPU) runtime
writes: one event per executed thunk, named after its HLO instruction. Each instruction's
``op_name`` carries the named scopes of the code that emitted it (`attention`, `norm`,
`rope`, `linear`, `effective_weight`, `dequantize`, `lm_head`, `loss`, `embed`,
`optimizer`) and its phase (forward; backward: ``transpose(...)``; recomputed for remat:
``rematted_computation``), so the table says which part of the model, in which phase, costs
what, and how much of it is matrix multiplication (thunks whose computation holds a dot).

    .venv/bin/python benchmarks/profile_step.py                       # QLoRA, SmolLM2, 4 x 256
    .venv/bin/python benchmarks/profile_step.py --variant lora --remat none
    .venv/bin/python benchmarks/profile_step.py --out /tmp/prof       # keep the trace and HLO

The percentages are shares of the summed thunk time on the runtime's threads (thunks of one
step can run concurrently on the CPU's threads, so the sum can exceed the step's wall time).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

SCOPES = ("embed", "norm", "rope", "attention", "linear", "effective_weight", "dequantize",
          "lm_head", "loss", "optimizer")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^ ]+ (\w[\w\-]*)\((.*)$")


def instructions(hlo_text: str) -> dict[str, tuple[bool, str, str]]:
    """``{instruction: (is a matmul, opcode or fusion kind, op_name)}`` of a compiled module;
    a fusion is a matmul when its fused computation contains a dot or a convolution."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    has_dot = {c: any(re.search(r" (dot|convolution)\(", x) for x in body)
               for c, body in comps.items()}
    out = {}
    for body in comps.values():
        for line in body:
            m = _INSTR.match(line)
            if not m:
                continue
            name, opcode, rest = m.groups()
            kind = re.search(r"kind=(\w+)", rest) if opcode == "fusion" else None
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            op = re.search(r'op_name="([^"]*)"', rest)
            mm = opcode in ("dot", "convolution") or (
                opcode == "fusion" and calls is not None and has_dot.get(calls.group(1), False))
            out[name] = (mm, kind.group(1) if kind else opcode, op.group(1) if op else "")
    return out


def classify(op_name: str) -> tuple[str, str]:
    """(model part, phase) of an instruction from its op_name: the innermost named scope, and
    forward / backward / remat (the forward recomputed inside the backward)."""
    parts = [p for p in re.split(r"[/()]", op_name) if p]
    scope = next((p for p in reversed(parts) if p in SCOPES), "other")
    if scope == "effective_weight":
        scope = "linear: W + sAB"
    elif scope == "dequantize":
        scope = "linear: dequantize"
    phase = ("remat" if "rematted_computation" in parts else
             "backward" if "transpose(" in op_name else "forward")
    return scope, phase


def thunk_times(trace: dict) -> collections.Counter:
    """Self time (us) per thunk name, summed over the runtime's threads: nested events (a
    while loop's body inside the while thunk) are charged to the innermost one."""
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_thread = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and "XLA" in threads.get((e["pid"], e["tid"]), "") \
                and "::" not in e["name"] and not e["name"].startswith("end: "):
            by_thread[e["pid"], e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    self_us: collections.Counter = collections.Counter()
    for events in by_thread.values():
        events.sort(key=lambda x: (x[0], -x[1]))  # a parent before the children it contains
        stack: list[tuple[float, str]] = []  # (end, name) of the open events
        for start, end, name in events:
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack:
                self_us[stack[-1][1]] -= end - start
            stack.append((end, name))
            self_us[name] += end - start
    return self_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="qlora", choices=(*bench_train.VARIANTS,
                                                           *bench_train.KERNEL_VARIANTS))
    ap.add_argument("--model", default=bench_train.SMOLLM2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--remat", default="attn", choices=bench_train.REMAT_POLICIES)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=3, help="timed steps before the traced one")
    ap.add_argument("--top", type=int, default=12, help="the slowest instructions listed")
    ap.add_argument("--out", help="keep the trace and the compiled HLO in this folder")
    args = ap.parse_args()

    import jax

    peak = bench_train.matmul_gflops(dtype=args.dtype)
    st = bench_train.build_step(args.variant, args.batch, args.seq, args.rank, args.remat,
                                args.model, args.dtype)
    float(st.run())
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        float(st.run())
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    out = Path(args.out or tempfile.mkdtemp(prefix="jaxlora_profile_"))
    out.mkdir(parents=True, exist_ok=True)
    hlo = st.compiled.as_text()
    (out / "step.hlo.txt").write_text(hlo)
    t = time.perf_counter()
    with jax.profiler.trace(str(out)):
        float(st.run())
    traced_s = time.perf_counter() - t
    trace_file = max(out.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(trace_file) as f:
        self_us = thunk_times(json.load(f))

    instr = instructions(hlo)
    total = sum(self_us.values())
    parts: collections.Counter = collections.Counter()
    matmul: collections.Counter = collections.Counter()
    for name, us in self_us.items():
        is_mm, _, op_name = instr.get(name, (False, "?", ""))
        key = classify(op_name)
        parts[key] += us
        if is_mm:
            matmul[key] += us
    flops = bench_train.model_flops(args.variant, st.n_params, args.batch * args.seq)
    mm = sum(matmul.values())
    print(f"{args.model} {args.variant}, batch {args.batch} x {args.seq}, r={args.rank}, "
          f"remat {args.remat}, {args.dtype}, on {jax.devices()[0].device_kind}; "
          f"{args.dtype} matmul rate {peak:.0f} GFLOP/s in this run")
    print(f"step {step_s:.3f} s (median of {args.steps}; traced step {traced_s:.3f} s), "
          f"model FLOPs {flops / 1e9:.0f} G = {flops / step_s / 1e9:.0f} GFLOP/s "
          f"({100 * flops / step_s / 1e9 / peak:.0f}% of the matmul rate); thunk time "
          f"{total / 1e6:.3f} s, of it matmul {100 * mm / total:.0f}% "
          f"(model FLOPs / matmul time: {flops / (mm / 1e6) / 1e9:.0f} GFLOP/s)\n")
    print("| part | phase | time (ms) | share | of it matmul |")
    print("|---|---|---|---|---|")
    for (scope, phase), us in parts.most_common():
        if us >= 0.002 * total:
            print(f"| {scope} | {phase} | {us / 1e3:.1f} | {100 * us / total:.1f}% | "
                  f"{100 * matmul[scope, phase] / us:.0f}% |")
    by_scope: collections.Counter = collections.Counter()
    for (scope, _), us in parts.items():
        by_scope[scope] += us
    print("\nby part, all phases: " + ", ".join(
        f"{s} {100 * us / total:.1f}%" for s, us in by_scope.most_common()))
    print(f"\nthe {args.top} slowest instructions (self time over the step):")
    for name, us in self_us.most_common(args.top):
        _, kind, op_name = instr.get(name, (False, "?", ""))
        print(f"  {us / 1e3:8.1f} ms  {name} [{kind}]  {op_name[-110:]}")
    print(f"\ntrace and HLO: {out}")


if __name__ == "__main__":
    main()
