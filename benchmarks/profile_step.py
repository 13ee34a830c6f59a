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

Thunks of one step run concurrently on the CPU's threads (two dots at once, each on one
core, each taking twice as long): every instant is split among the thunks running then, so a
part's time is its share of the traced step's wall time and the parts add up to the time the
runtime was busy.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
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


def _dims(shape: str) -> list[int]:
    return [int(d) for d in shape.split(",") if d]


def instructions(hlo_text: str) -> dict[str, tuple[int, str, str]]:
    """``{instruction: (matmul FLOPs per execution, opcode or fusion kind, op_name)}`` of a
    compiled module; a fusion's FLOPs are those of the dots in its fused computation
    (``2 x output elements x contracted size`` each)."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    shapes = {}
    for body in comps.values():
        for line in body:
            m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]", line)
            if m:
                shapes[m.group(1)] = _dims(m.group(2))

    def dot_flops(line: str) -> int:
        m = re.search(r"= \w+\[([\d,]*)\]\S* (?:dot|convolution)\(%?([\w.\-]+)", line)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if not m or not contracting or m.group(2) not in shapes:
            return 0
        lhs = shapes[m.group(2)]
        return 2 * math.prod(_dims(m.group(1))) * math.prod(lhs[d] for d in _dims(contracting.group(1)))

    comp_flops = {c: sum(dot_flops(x) for x in body) for c, body in comps.items()}
    fused = set(re.findall(r"fusion\(.*calls=%?([\w.\-]+)", hlo_text))
    out = {}  # the instructions that run as thunks: those outside fused computations
    for comp, body in comps.items():
        if comp in fused:
            continue
        for line in body:
            m = _INSTR.match(line)
            if not m:
                continue
            name, opcode, rest = m.groups()
            kind = re.search(r"kind=(\w+)", rest) if opcode == "fusion" else None
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            op = re.search(r'op_name="([^"]*)"', rest)
            flops = dot_flops(line) if opcode in ("dot", "convolution") else (
                comp_flops.get(calls.group(1), 0) if opcode == "fusion" and calls else 0)
            out[name] = (flops, kind.group(1) if kind else opcode, op.group(1) if op else "")
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


def _innermost(events: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """One thread's (start, end, name) events, nested, cut into the stretches where each is
    the innermost open event."""
    events = sorted(events, key=lambda x: (x[0], -x[1]))  # a parent before its children
    out = []
    stack: list[list] = []  # [end, name, start of its current stretch] of the open events

    def close(until: float) -> None:
        while stack and stack[-1][0] <= until:
            end, name, since = stack.pop()
            out.append((since, end, name))
            if stack:
                stack[-1][2] = end

    for start, end, name in events:
        close(start)
        if stack:
            out.append((stack[-1][2], start, stack[-1][1]))
        stack.append([end, name, start])
    close(float("inf"))
    return out


def thunk_times(trace: dict) -> tuple[collections.Counter, collections.Counter]:
    """(wall time in us charged to each thunk name, how many times it ran).

    Nested events (a while loop's body inside the while thunk) are charged to the innermost
    one, and an instant when k thunks run at once on the runtime's threads is split k ways, so
    the charges add up to the time at least one thunk was running: a thunk that shares the
    cores with another counts for half of its duration, not all of it.
    """
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_thread = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and "XLA" in threads.get((e["pid"], e["tid"]), "") \
                and "::" not in e["name"] and not e["name"].startswith("end: "):
            by_thread[e["pid"], e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    runs = collections.Counter(name for events in by_thread.values() for _, _, name in events)
    segments = [seg for events in by_thread.values() for seg in _innermost(events)
                if seg[1] > seg[0]]
    points = sorted([(s_, 1, i) for i, (s_, _, _) in enumerate(segments)]
                    + [(e_, -1, i) for i, (_, e_, _) in enumerate(segments)])
    charged: collections.Counter = collections.Counter()
    active: set[int] = set()
    last = None
    for t, kind, i in points:
        if active and t > last:
            share = (t - last) / len(active)
            for j in active:
                charged[segments[j][2]] += share
        last = t
        (active.add if kind == 1 else active.discard)(i)
    return collections.Counter({k: v for k, v in charged.items() if v > 0}), runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="qlora", choices=bench_train.ALL_VARIANTS)
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
        charged, runs = thunk_times(json.load(f))

    instr = instructions(hlo)
    busy = sum(charged.values())
    parts: collections.Counter = collections.Counter()
    mm_us: collections.Counter = collections.Counter()
    mm_flops: collections.Counter = collections.Counter()
    for name, us in charged.items():
        flops, _, op_name = instr.get(name, (0, "?", ""))
        key = classify(op_name)
        parts[key] += us
        if flops:
            mm_us[key] += us
            mm_flops[key] += flops * runs[name]
    model = bench_train.model_flops(args.variant, st.n_params, args.batch * args.seq)
    executed = sum(mm_flops.values())
    print(f"{args.model} {args.variant}, batch {args.batch} x {args.seq}, r={args.rank}, "
          f"remat {args.remat}, {args.dtype}, on {jax.devices()[0].device_kind}; "
          f"{args.dtype} matmul rate {peak:.0f} GFLOP/s in this run")
    print(f"step {step_s:.3f} s (median of {args.steps}); traced step {traced_s:.3f} s, the "
          f"runtime busy {busy / 1e6:.3f} s of it; model FLOPs {model / 1e9:.0f} G = "
          f"{model / step_s / 1e9:.0f} GFLOP/s ({100 * model / step_s / 1e9 / peak:.0f}% of the "
          f"matmul rate); matmuls executed {executed / 1e9:.0f} G ({executed / model:.2f}x the "
          f"model's) in {sum(mm_us.values()) / 1e6:.3f} s = "
          f"{executed / sum(mm_us.values()) / 1e3:.0f} GFLOP/s\n")
    print("| part | phase | time (ms) | share of busy time | matmul share | matmul GFLOP | "
          "matmul GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for (scope, phase), us in parts.most_common():
        if us >= 0.002 * busy:
            key = scope, phase
            rate = f"{mm_flops[key] / mm_us[key] / 1e3:.0f}" if mm_us[key] else "-"
            print(f"| {scope} | {phase} | {us / 1e3:.1f} | {100 * us / busy:.1f}% | "
                  f"{100 * mm_us[key] / us:.0f}% | {mm_flops[key] / 1e9:.1f} | {rate} |")
    by_scope: collections.Counter = collections.Counter()
    for (scope, _), us in parts.items():
        by_scope[scope] += us
    print("\nby part, all phases: " + ", ".join(
        f"{s} {100 * us / busy:.1f}%" for s, us in by_scope.most_common()))
    print(f"\nthe {args.top} costliest instructions (time charged over the step, runs, GFLOP/s):")
    for name, us in charged.most_common(args.top):
        flops, kind, op_name = instr.get(name, (0, "?", ""))
        rate = f"{flops * runs[name] / us / 1e3:5.0f}" if flops else "    -"
        print(f"  {us / 1e3:8.1f} ms {runs[name]:4d}x {rate}  {name} [{kind}]  {op_name[-100:]}")
    print(f"\ntrace and HLO: {out}")


if __name__ == "__main__":
    main()
