"""QLoRA at 7B scale on a CPU machine: a Llama-7B-shaped model, streamed and quantized on load.

The model has Llama 2 7B's shapes (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000,
untied head) and random bfloat16 weights. The benchmark

1. writes it as a sharded Hugging Face checkpoint (`model-0000k-of-0000n.safetensors` +
   `model.safetensors.index.json`, ~13 GB) into a temporary folder under /tmp, one tensor at a
   time (the float model never exists in memory, here either);
2. in a fresh process, loads it with NF4 + double quantization on load (`jaxlora.io.load_model`,
   the path `jaxlora train` takes) and reports the load's peak RSS, its time, the quantized
   bytes and bits per parameter, and how far the peak rose above the loaded tree (the float
   transient of the load: at most one layer is the target);
3. in the same process, after resetting the kernel's peak-RSS mark (VmHWM), runs QLoRA
   training steps (batch 1 x 256, r=16 on all linear layers, remat) and reports the median step
   time and the train-step peak RSS;
4. deletes the checkpoint.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_scale.py            # 3 steps
    .venv/bin/python benchmarks/bench_scale.py --steps 2 --remat full --keep DIR

It prints one JSON line (and `--json FILE` writes it), which `benchmarks/bench_plan.py
--scale FILE` puts beside the memory planner's prediction.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# Llama 2 7B's shapes (Touvron et al. 2023, "Llama 2", table 1 and its config.json).
LLAMA_7B = dict(arch="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                num_kv_heads=32, head_dim=128, intermediate_size=11008,
                max_position_embeddings=4096, rope_theta=10000.0, norm_eps=1e-5,
                tie_embeddings=False, name="llama-7b-shaped")
LAYERS_PER_SHARD = 4


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bfloat16 values of magnitude 2^-7..2^-5 and random sign, made from random bits
    (a normal draw of 6.7e9 values would take minutes of the benchmark's CPU)."""
    import ml_dtypes

    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    bits = (bits & 0x80FF) | (120 << 7)  # sign, mantissa, exponent 120 or 121
    return bits.view(ml_dtypes.bfloat16)


def write_checkpoint(folder: str, layers_per_shard: int = LAYERS_PER_SHARD) -> int:
    """The sharded bf16 checkpoint of `LLAMA_7B` in `folder`; returns its bytes."""
    import ml_dtypes

    from jaxlora import models
    from jaxlora.io.hf import config_to_hf, write_safetensors
    from jaxlora.io.tokenizer import Tokenizer
    from jaxlora.models import ModelConfig

    cfg = ModelConfig(**LLAMA_7B)
    fam = models.family(cfg)
    shapes = models.param_shapes(cfg)
    rng = np.random.default_rng(0)
    groups: dict[str, dict] = {}  # shard name -> {hf name: (shape, dtype, make)}
    n_shards = 2 + -(-cfg.num_layers // layers_per_shard)

    def put(shard: int, name: str, shape: tuple[int, ...]) -> None:
        fname = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        groups.setdefault(fname, {})[fam.hf_prefix + name] = (
            shape, ml_dtypes.bfloat16, lambda: random_bf16(rng, shape))

    for t in fam.tensors:  # torch Linear weights are [out, in]: kernels [in, out] reversed
        if t.path not in shapes:
            continue
        shape = shapes[t.path]
        if "{i}" in t.hf:
            item = shape[1:][::-1] if t.path.endswith("/kernel") else shape[1:]
            for i in range(cfg.num_layers):
                put(1 + i // layers_per_shard, t.hf.format(i=i), item)
        else:
            put(0 if t.path.startswith("embed") else n_shards - 1, t.hf,
                shape[::-1] if t.path.endswith("/kernel") else shape)
    weight_map = {}
    for fname in sorted(groups):
        write_safetensors(os.path.join(folder, fname), groups[fname], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(groups[fname], fname))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, "bfloat16"), f, indent=2)
    Tokenizer.byte_level().save(folder)
    return sum(os.path.getsize(os.path.join(folder, g)) for g in groups)


def _vm(key: str) -> float:
    """A `/proc/self/status` figure in MiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _child(folder: str, steps: int, batch: int, seq: int, rank: int, remat: str) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxlora import data, io, lora, memory, models, optim, quant, train

    jnp.zeros(1).block_until_ready()
    rss_start = _vm("VmRSS")
    t = time.perf_counter()
    m = io.load_model(folder, quant=quant.QuantRules(qtype="nf4", double_quant=True))
    jax.block_until_ready(jax.tree.leaves(m.params))
    load_s = time.perf_counter() - t
    load_peak, loaded_rss = memory.peak_rss_mb(), _vm("VmRSS")
    rep = quant.report(m.params)
    cfg = m.config
    layer_float = 4 * sum(math.prod(s[1:]) for p, s in models.param_shapes(cfg).items()
                          if p.startswith("layers/"))  # one layer's parameters in float32

    spec = lora.LoraSpec(rank=rank, alpha=2.0 * rank, targets="all-linear")
    tx = optim.make_optimizer(optim.OptimSpec(), total_steps=steps)
    state = train.init_state(lora.init(jax.random.key(0), m.params, spec), tx, 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq + 1), np.int32)
    b = data.Batch(inputs=jnp.asarray(tokens[..., :-1]), targets=jnp.asarray(tokens[..., 1:]),
                   loss_mask=jnp.ones((1, batch, seq), jnp.float32),
                   segment_ids=jnp.ones((1, batch, seq), jnp.int32),
                   positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, batch, seq)))
    memory.return_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS: the steps' own peak next
        f.write("5")
    t = time.perf_counter()
    step = train.compile_step(train.make_train_step(cfg, tx, remat=remat, dropout=False),
                              state, m.params, b)
    compile_s = time.perf_counter() - t
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, m.params, b)
        losses.append(float(metrics.loss))
        times.append(time.perf_counter() - t)
    return {
        "params": rep.total_params, "linear_params": rep.quantized_params,
        "quantized_bytes": rep.quantized_bytes, "linear_bits_per_param": rep.quantized_bits_per_param,
        "base_bytes": rep.total_bytes, "rss_after_imports_mb": rss_start, "load_s": load_s,
        "load_peak_rss_mb": load_peak, "loaded_rss_mb": loaded_rss,
        "load_transient_mb": load_peak - loaded_rss, "one_layer_float32_mb": layer_float / 2**20,
        "compile_s": compile_s, "step_s": times, "median_step_s": statistics.median(times[1:] or times),
        "tokens_per_s": batch * seq / statistics.median(times[1:] or times),
        "train_peak_rss_mb": _vm("VmHWM"), "losses": losses,
        "adapter_params": sum(int(x.size) for x in jax.tree.leaves(state.adapters)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="train steps (the first one's time "
                    "is reported but left out of the median)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--remat", default="full", choices=("none", "full", "attn", "dots"))
    ap.add_argument("--keep", metavar="DIR", help="write (or reuse) the checkpoint in DIR and keep it")
    ap.add_argument("--json", metavar="FILE", help="also write the result line to FILE")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.batch, args.seq, args.rank,
                                args.remat)))
        return
    folder = args.keep or tempfile.mkdtemp(prefix="jaxlora-7b-", dir="/tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        t = time.perf_counter()
        if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
            size = write_checkpoint(folder)
        else:
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                       if f.endswith(".safetensors"))
        write_s = time.perf_counter() - t
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(
            [sys.executable, __file__, "--child", folder, "--steps", str(args.steps),
             "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
             "--remat", args.remat], check=True, capture_output=True, text=True, env=env)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(checkpoint_bytes=size, write_s=write_s, batch=args.batch, seq=args.seq,
                   rank=args.rank, remat=args.remat, shards=len(
                       [f for f in os.listdir(folder) if f.endswith(".safetensors")]))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    line = json.dumps(row)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
