"""Generation throughput of SmolLM2-135M-Instruct (float32) on CPU at batch 1 and 8.

    .venv/bin/python benchmarks/bench_generate.py [--new 64] [--repeats 3]

Each configuration is compiled and warmed up once, then timed `--repeats` times (median).
Rows use the same chat prompt; EOS is disabled so every row produces exactly `--new` tokens.
tokens/s counts generated tokens (batch x new) over the wall time of the whole call
(prefill + decode loop + host transfer). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

from jaxlora.generate import generate_tokens
from jaxlora.io import load_model

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain LoRA in one sentence.", "Name three primary colors.",
           "What is 12 times 7?", "Give me a synonym for happy.",
           "Who wrote Hamlet?", "Translate 'thank you' into French."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()

    m = load_model("smollm2-135m-instruct")
    tok = m.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}],
                                              add_generation_prompt=True)) for p in PROMPTS]
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        prompts = [ids[i % len(ids)] for i in range(b)]

        def run(prompts=prompts):
            return generate_tokens(m.config, m.params, prompts, max_new_tokens=args.new,
                                   eos_id=[])

        t0 = time.perf_counter()
        out = run()
        first = time.perf_counter() - t0
        assert all(len(o) == args.new for o in out)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append((b, max(map(len, prompts)), first, med, b * args.new / med))
    print(f"SmolLM2-135M-Instruct float32, {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPUs, {args.new} new tokens per row, median of {args.repeats}\n")
    print("| batch | longest prompt | first call (compile + run) s | time s | tokens/s |")
    print("|---|---|---|---|---|")
    for b, p, first, med, tps in rows:
        print(f"| {b} | {p} | {first:.1f} | {med:.2f} | {tps:.1f} |")


if __name__ == "__main__":
    main()
