"""Every benchmark in one command (`make bench`): each runs in its own process, and its output
goes into benchmarks/RESULTS.md under the machine it ran on.

The section between the markers `<!-- make bench: begin -->` and `<!-- make bench: end -->`
of RESULTS.md is rewritten (added at the top the first time); the rest of the file, the
annotated results of earlier sessions, is kept byte for byte. The section starts with the
date, the commit, the machine (CPU model, cores, memory, accelerator), the library versions
and the float32 matmul rate measured at the start of the run, then gives each benchmark's
command, wall time and output (its Markdown tables). A benchmark that fails is recorded with
the end of its error output and the others still run; the exit code is then 1. The file is
replaced atomically.

    .venv/bin/python benchmarks/run_all.py                  # all, about 6 min on 2 quiet CPU cores
    .venv/bin/python benchmarks/run_all.py --only quant,compile
    .venv/bin/python benchmarks/run_all.py --out /tmp/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"
# name -> arguments of `python benchmarks/...`
SUITE = {
    "quant": ["bench_quant.py"],
    "lora": ["bench_lora.py"],
    "load": ["bench_load.py"],
    "train": ["bench_train.py", "--variants", "lora,qlora,qlora-fp4,qlora-int4,full",
              "--steps", "3"],
    "compile": ["bench_compile.py"],
    "generate": ["bench_generate.py"],
}


def splice(text: str, section: str) -> str:
    """``text`` with the marked section replaced by ``section`` (inserted after the title
    line when there is none yet); everything else unchanged."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    title, sep, body = text.partition("\n")
    return f"{title}{sep}\n{block}\n{body}" if sep else f"{text}\n\n{block}\n"


def machine() -> str:
    """One line: CPU model, cores, memory, and the accelerator JAX sees."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    dev = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores{mem}; JAX backend {jax.default_backend()} "
            f"({dev.device_kind})")


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                       text=True)
    return r.stdout.strip() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated subset of {', '.join(SUITE)}")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        print(f"run_all: unknown benchmark(s) {', '.join(unknown)} ({', '.join(SUITE)})",
              file=sys.stderr)
        return 2

    import jax

    import jaxlora

    sys.path.insert(0, str(HERE))
    from bench_train import matmul_gflops

    started = datetime.datetime.now(datetime.UTC)
    lines = [
        f"## Latest `make bench` run ({started:%Y-%m-%d %H:%M} UTC, commit {_commit()})", "",
        f"Machine: {machine()}. Python {platform.python_version()}, jax {jax.__version__}, "
        f"jaxlora {jaxlora.__version__}. Float32 matmul rate at the start: "
        f"{matmul_gflops():.0f} GFLOP/s ([1024, 2048] x [2048, 2048] under jit). Written by "
        "`benchmarks/run_all.py`; each benchmark in its own process, one after another.", "",
    ]
    failed = []
    for name in names:
        cmd = [sys.executable, str(HERE / SUITE[name][0]), *SUITE[name][1:]]
        shown = " ".join([".venv/bin/python", f"benchmarks/{SUITE[name][0]}", *SUITE[name][1:]])
        print(f"run_all: {shown}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        lines += [f"### bench: {name}", "", f"`{shown}` ({wall:.0f} s)", ""]
        if r.returncode == 0:
            lines += [r.stdout.strip(), ""]
        else:
            failed.append(name)
            tail = "\n".join(r.stderr.strip().splitlines()[-8:])
            lines += [f"FAILED (exit {r.returncode}):", "", "```", tail, "```", ""]
    out = Path(args.out)
    text = out.read_text() if out.exists() else "# Benchmark results\n"
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        f.write(splice(text, "\n".join(lines)))
    os.replace(f.name, out)
    print(f"run_all: wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
