"""Compile time of the QLoRA training step against depth: scanned blocks against unrolled ones.

A SmolLM2-135M-shaped model (hidden 576, 9 heads, 3 KV heads, MLP 1536, vocabulary 49,152)
with random weights, NF4 + double quant, r=8 adapters on all linear layers, batch 4 x 256,
remat attn, AdamW: the step `jaxlora train` compiles (`train.make_train_step`), traced and
lowered (`lower`) and compiled by XLA (`compile`) for each depth. With the blocks under
`lax.scan` (the default) the program holds one block whatever the depth, so compile time
stays flat; unrolled (`scan_layers=False`) it grows with every block.

    .venv/bin/python benchmarks/bench_compile.py
    .venv/bin/python benchmarks/bench_compile.py --scanned 2,30 --unrolled 2,4
"""

from __future__ import annotations

import argparse
import time


def measure(layers: int, scan: bool, batch: int = 4, seq: int = 256) -> dict:
    """Lower and compile seconds of the step, and its optimized HLO's instruction count."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxlora import data, lora, models, quant, train

    cfg = models.ModelConfig(arch="llama", name=f"smollm2-shape-{layers}", vocab_size=49152,
                             hidden_size=576, num_layers=layers, num_heads=9, num_kv_heads=3,
                             head_dim=64, intermediate_size=1536, tie_embeddings=True,
                             max_position_embeddings=2048, rope_theta=100000.0)
    params = models.init_params(cfg, jax.random.key(0), jnp.float32)
    base = quant.quantize_tree(params, quant.QuantRules(qtype="nf4"))[0]
    tx = optax.adamw(1e-4)
    spec = lora.LoraSpec(rank=8, alpha=16.0, targets="all-linear")
    state = train.init_state(lora.init(jax.random.key(1), base, spec), tx, 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq + 1))
    b = data.Batch(
        inputs=jnp.asarray(tokens[..., :-1], jnp.int32),
        targets=jnp.asarray(tokens[..., 1:], jnp.int32),
        loss_mask=jnp.ones((1, batch, seq), jnp.float32),
        segment_ids=jnp.ones((1, batch, seq), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, batch, seq)),
    )
    step = train.make_train_step(cfg, tx, remat="attn", dropout=False, scan_layers=scan)
    t = time.perf_counter()
    lowered = step.lower(state, base, b)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    n_instr = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
    return {"layers": layers, "scan": scan, "lower_s": lower_s, "compile_s": compile_s,
            "hlo_instructions": n_instr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scanned", default="1,2,4,8,16,30,60", help="depths with scanned blocks")
    ap.add_argument("--unrolled", default="1,2,4,8", help="depths with unrolled blocks")
    args = ap.parse_args()
    points = [(int(n), True) for n in args.scanned.split(",") if n] + [
        (int(n), False) for n in args.unrolled.split(",") if n]
    print("SmolLM2-135M-shaped QLoRA step (NF4 + DQ, r=8 all linear, batch 4 x 256, remat "
          "attn), random weights\n")
    print("| blocks | layers | lower (s) | compile (s) | total (s) | HLO instructions |")
    print("|---|---|---|---|---|---|")
    for layers, scan in points:
        r = measure(layers, scan)
        print(f"| {'scanned' if scan else 'unrolled'} | {layers} | {r['lower_s']:.1f} | "
              f"{r['compile_s']:.1f} | {r['lower_s'] + r['compile_s']:.1f} | "
              f"{r['hlo_instructions']} |", flush=True)


if __name__ == "__main__":
    main()
