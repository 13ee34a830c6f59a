"""Training-step throughput and memory on SmolLM2-135M (or `--model gemma3-270m`, or a random
1B-shaped Llama built in memory, `--model llama-1b`): LoRA, QLoRA (NF4; `qlora-fp4`,
`qlora-int4`: the other 4-bit bases) and full fine-tuning.

Each variant runs in a fresh subprocess (so peak RSS is its own), one after another in this
run (with --rounds several times, each beside its PEFT peer), on a random token batch of
4 x 256 with r=8 adapters on all seven linear kinds, float32 compute (`--dtype bfloat16`: the
base and the compute in bfloat16). Reported: median step time over the timed steps after a
warm-up (compile) step, tokens/s, peak RSS (after the first timed step), the accelerator's
peak memory (`memory_stats`, where the backend has it), and the step's model FLOPs per second
against the matmul rate of the compute dtype measured between the variant's own timed steps,
so that the machine's load at that moment divides out (on GPU that ratio is the MFU). Variant
``qlora`` matmuls its NF4 base as `--kernel` says (`quant.kernel`, default auto);
``qlora-xla`` and ``qlora-pallas`` fix the path (`jaxlora.kernels`).

    .venv/bin/python benchmarks/bench_train.py            # lora, qlora, full
    .venv/bin/python benchmarks/bench_train.py --variants qlora,qlora-fp4,qlora-int4
    .venv/bin/python benchmarks/bench_train.py --steps 3  # fewer timed steps
    .venv/bin/python benchmarks/bench_train.py --model gemma3-270m --variants qlora
    .venv/bin/python benchmarks/bench_train.py --peers /tmp/scratch/bin/python
        # also PEFT LoRA and PEFT + bitsandbytes QLoRA (benchmarks/peers/peft_train.py) in a
        # scratch virtualenv with torch/transformers/peft/bitsandbytes, in the same run
    .venv/bin/python benchmarks/bench_train.py --variants lora,qlora --rounds 3 --peers ...
        # every variant 3 times, interleaved with its peer; median of the rounds
    .venv/bin/python benchmarks/bench_train.py --variants lora,qlora --rounds 3 --against TREE
        # also on another checkout's jaxlora (git worktree add TREE REV), interleaved: before
        # and after a change, side by side
    python3 benchmarks/bench_train.py --model llama-1b --dtype bfloat16 --batch 8 --seq 1024 \
        --variants lora,qlora,qlora-xla   # on a GPU (benchmarks/gpu_suite.sh)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from jaxlora.models.common import REMAT_POLICIES

VARIANTS = ("lora", "qlora", "full")
# Every QLoRA variant: (the base's qtype, the NF4 matmul path; None: --kernel decides).
QUANT_VARIANTS = {"qlora": ("nf4", None), "qlora-fp4": ("fp4", None),
                  "qlora-int4": ("int4", None), "qlora-xla": ("nf4", "xla"),
                  "qlora-pallas": ("nf4", "pallas")}
KERNEL_VARIANTS = {v: k for v, (_, k) in QUANT_VARIANTS.items() if k}  # a fixed path
ALL_VARIANTS = ("lora", "full", *QUANT_VARIANTS)
N_PARAMS = 134_515_008  # SmolLM2-135M parameters (tied embedding counted once), for the peers
SMOLLM2 = "smollm2-135m-instruct"
# Random models built in memory: a Llama-3.2-1B shape (32k vocabulary) and a tiny copy of it
# for dry runs of the GPU suite on CPU.
IN_MEMORY = {
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, intermediate_size=8192),
    "llama-1b-tiny": dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, intermediate_size=256),
}


class Ceiling:
    """The matmul rate that the step's share is against: ``[m, k] @ [k, n]`` in ``dtype``
    under jit (default: the baselines' float32 shape), timed on demand. Its operands are made
    afresh for each timing and dropped after it; the heap still grows by ~50 MiB once it has
    run, so `_child` reads the peak RSS before timing it."""

    def __init__(self, dtype: str = "float32", shape: tuple[int, int, int] = (1024, 2048, 2048)):
        import jax

        self.dtype, self.shape = dtype, shape
        self.flops = 2 * shape[0] * shape[1] * shape[2]
        self.f = jax.jit(lambda a, b: a @ b)

    def operands(self) -> tuple[Any, Any]:
        import jax
        import jax.numpy as jnp

        m, k, n = self.shape
        return (jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(self.dtype),
                jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(self.dtype))

    def gflops(self, repeats: int = 10) -> float:
        """The median rate of ``repeats`` timed calls (after one untimed), in GFLOP/s."""
        a, b = self.operands()
        self.f(a, b).block_until_ready()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            self.f(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        return self.flops / statistics.median(times) / 1e9


def _ceiling_shape() -> tuple[int, int, int]:
    """The ceiling's matmul: on GPU one big enough to reach the device's peak rate."""
    import jax

    return (8192, 8192, 8192) if jax.default_backend() == "gpu" else (1024, 2048, 2048)


def matmul_gflops(repeats: int = 10, dtype: str = "float32",
                  shape: tuple[int, int, int] = (1024, 2048, 2048)) -> float:
    """The `Ceiling` rate, measured once."""
    return Ceiling(dtype, shape).gflops(repeats)


def _load(model: str, rules, dtype):
    """(model config, base params): a registry model, or one of `IN_MEMORY` (random, seed 0)."""
    import jax

    from jaxlora import io, models, quant

    if model not in IN_MEMORY:
        loaded = io.load_model(model, quant=rules, dtype=dtype)
        return loaded.config, loaded.params
    cfg = models.ModelConfig(arch="llama", name=model, tie_embeddings=True,
                             max_position_embeddings=8192, rope_theta=500000.0,
                             **IN_MEMORY[model])
    params = models.init_params(cfg, jax.random.key(0), dtype)
    return cfg, (quant.quantize_tree(params, rules)[0] if rules is not None else params)


class Step(NamedTuple):
    """A built training step: ``run()`` takes one step and returns its loss (a device scalar)."""
    run: Callable[[], Any]
    compiled: Any  # the compiled program (its ``as_text()`` names the profile's thunks)
    n_params: int  # the model's parameters (tied embedding once)
    trainable: int
    compile_s: float


def build_step(variant: str, batch: int, seq: int, rank: int, remat: str, model: str,
               dtype: str = "float32", kernel: str = "auto") -> Step:
    """One variant's training step on a random token batch, compiled (as `jaxlora train`
    compiles it), r-`rank` adapters on all linear layers, plain optax AdamW."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxlora import data, lora, models, quant, train

    if variant not in ALL_VARIANTS:
        raise SystemExit(f"bench_train: unknown variant {variant!r} ({', '.join(ALL_VARIANTS)})")
    qtype, path = QUANT_VARIANTS.get(variant, (None, None))
    rules = None if qtype is None else quant.QuantRules(qtype=qtype, kernel=path or kernel)
    cfg, base = _load(model, rules, jnp.dtype(dtype))
    n_params = sum(math.prod(s) for s in models.param_shapes(cfg).values())  # tied: once
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, batch, seq + 1)).astype(np.int32)
    b = data.Batch(
        inputs=jnp.asarray(tokens[..., :-1]), targets=jnp.asarray(tokens[..., 1:]),
        loss_mask=jnp.ones((1, batch, seq), jnp.float32),
        segment_ids=jnp.ones((1, batch, seq), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, batch, seq)),
    )
    tx = optax.adamw(1e-4, weight_decay=0.0)  # plain optax: the same in every tree (--against)
    t = time.perf_counter()
    if variant == "full":
        opt_state = tx.init(base)

        def loss(params, batch):
            one = jax.tree.map(lambda x: x[0], batch)
            total, count = train.loss_and_count(None, params, one, mcfg=cfg, remat=remat,
                                                compute_dtype=jnp.dtype(dtype))
            return total / count

        @jax.jit
        def step(params, opt_state, batch):
            value, grads = jax.value_and_grad(loss)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        compiled = step.lower(base, opt_state, b).compile()

        def run_step():
            nonlocal base, opt_state
            base, opt_state, value = compiled(base, opt_state, b)
            return value
        trainable = sum(int(x.size) for x in jax.tree.leaves(base))
    else:
        spec = lora.LoraSpec(rank=rank, alpha=2.0 * rank, targets="all-linear")
        adapters = lora.init(jax.random.key(0), base, spec)
        state = train.init_state(adapters, tx, 0)
        compiled = train.compile_step(train.make_train_step(cfg, tx, remat=remat, dropout=False,
                                                            compute_dtype=jnp.dtype(dtype)),
                                      state, base, b)  # as `jaxlora train` does

        def run_step():
            nonlocal state
            state, m = compiled(state, base, b)
            return m.loss
        trainable = sum(int(x.size) for x in jax.tree.leaves(adapters))
    return Step(run_step, compiled, n_params, trainable, time.perf_counter() - t)


def model_flops(variant: str, n_params: int, n_tokens: int) -> int:
    """Forward 2PN; backward: input gradients 2PN (+ weight gradients 2PN for full FT)."""
    return (6 if variant == "full" else 4) * n_params * n_tokens


def _child(variant: str, steps: int, batch: int, seq: int, rank: int, remat: str,
           model: str, dtype: str = "float32", kernel: str = "auto") -> dict:
    from jaxlora import kernels, memory

    st = build_step(variant, batch, seq, rank, remat, model, dtype, kernel)
    t = time.perf_counter()
    float(st.run())  # first step
    compile_s = st.compile_s + time.perf_counter() - t
    ceiling = Ceiling(dtype, _ceiling_shape())
    times, rates, peak_rss = [], [], None
    for _ in range(steps):  # the ceiling after every step: the machine's load as the steps saw it
        t = time.perf_counter()
        float(st.run())
        times.append(time.perf_counter() - t)
        # the peak before the ceiling first runs: its operands grow the heap by ~50 MiB
        peak_rss = memory.peak_rss_mb() if peak_rss is None else peak_rss
        rates.append(ceiling.gflops(3))
    step_s, rate = statistics.median(times), statistics.median(rates)
    n_tokens = batch * seq
    quantized = variant in QUANT_VARIANTS
    return {
        "variant": variant, "step_s": step_s, "compile_s": compile_s,
        "tokens_per_s": n_tokens / step_s, "peak_rss_mb": peak_rss,
        "device_peak_mb": memory.device_peak_mb(),
        "model_gflops": model_flops(variant, st.n_params, n_tokens) / step_s / 1e9,
        "ceiling_gflops": rate, "trainable": st.trainable,
        "kernel_choices": kernels.auto_choices() if quantized else [],
    }


def _jaxlora_child(args, variant: str, tree: str | None = None) -> dict:
    """One variant in a fresh process; with `tree`, importing that checkout's jaxlora."""
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
         "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
         "--remat", args.remat, "--model", args.model, "--dtype", args.dtype,
         "--kernel", args.kernel],
        check=True, capture_output=True, text=True, env=env,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if tree:
        row["variant"] = f"{variant} @ {os.path.basename(os.path.abspath(tree))}"
    return row


def _peer_child(args, hf_dir: str, variant: str) -> dict:
    """PEFT LoRA or QLoRA (benchmarks/peers/peft_train.py) on the same weights."""
    script = os.path.join(os.path.dirname(__file__), "peers", "peft_train.py")
    out = subprocess.run(
        [args.peers, script, hf_dir, "--variant", variant, "--steps", str(args.steps),
         "--batch", str(args.batch), "--seq", str(args.seq)],
        check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["model_gflops"] = 4 * N_PARAMS * args.batch * args.seq / r["step_s"] / 1e9
    r["compile_s"] = 0.0
    return r


def _merge_rounds(runs: list[dict]) -> dict:
    """One row from a variant's rounds: median step time, largest peak RSS."""
    step_s = statistics.median(r["step_s"] for r in runs)
    row = dict(runs[0])
    row.update(step_s=step_s, tokens_per_s=runs[0]["tokens_per_s"] * runs[0]["step_s"] / step_s,
               model_gflops=runs[0]["model_gflops"] * runs[0]["step_s"] / step_s,
               ceiling_gflops=statistics.median(r["ceiling_gflops"] for r in runs),
               peak_rss_mb=max(r["peak_rss_mb"] for r in runs),
               rounds=[round(r["step_s"], 2) for r in runs])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--remat", default="attn", choices=REMAT_POLICIES,
                    help="rematerialization policy of the blocks (default attn, the main job's)")
    ap.add_argument("--peers", metavar="PYTHON",
                    help="interpreter of a scratch venv with peft + bitsandbytes: run the peers too")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, interleaved (median of rounds)")
    ap.add_argument("--against", metavar="TREE",
                    help="another checkout of the repo (e.g. the commit before a change): every "
                         "variant also runs on its jaxlora, interleaved in the same rounds")
    ap.add_argument("--model", default=SMOLLM2,
                    help=f"the model (peers: SmolLM2 only); in memory: {', '.join(IN_MEMORY)}")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="float base leaves and compute dtype")
    ap.add_argument("--kernel", default="auto", choices=("auto", "xla", "pallas"),
                    help="quant.kernel of variant qlora (the NF4 base's matmul path)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.batch, args.seq, args.rank,
                                args.remat, args.model, args.dtype, args.kernel)))
        return

    import jax

    peak = matmul_gflops(dtype=args.dtype, shape=_ceiling_shape())
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as hf_dir:
        if args.peers:  # the same weights for the peers, as an HF folder written by jaxlora
            subprocess.run([sys.executable, "-c", (
                "from jaxlora import io; m = io.load_model('smollm2-135m-instruct'); "
                f"io.save_hf({hf_dir!r}, m.config, m.params, m.tokenizer)")], check=True)
        # Rounds interleave every variant, so a change in the machine's load hits all alike.
        for _ in range(args.rounds):
            for v in args.variants.split(","):
                runs.setdefault(v, []).append(_jaxlora_child(args, v))
                print(f"done {v}", file=sys.stderr, flush=True)
                if args.against:
                    runs.setdefault(f"{v}@", []).append(_jaxlora_child(args, v, args.against))
                    print(f"done {v} @ {args.against}", file=sys.stderr, flush=True)
                if args.peers and v in ("lora", "qlora"):
                    peer = _peer_child(args, hf_dir, v)  # its ceiling: the jaxlora run's before it
                    peer["ceiling_gflops"] = runs[v][-1]["ceiling_gflops"]
                    runs.setdefault(f"peft-{v}", []).append(peer)
                    print(f"done peft-{v}", file=sys.stderr, flush=True)
    rows = [_merge_rounds(r) for r in runs.values()]
    by = {r["variant"]: r for r in rows}
    print(f"{args.model}, batch {args.batch} x {args.seq}, r={args.rank} on all linear layers, "
          f"{args.dtype}, remat {args.remat}, median of {args.steps} steps, median of "
          f"{args.rounds} interleaved round(s); {args.dtype} matmul rate {peak:.0f} GFLOP/s "
          f"at the start on {jax.devices()[0].device_kind}; each row's share is of the rate "
          f"measured between its own steps (median; a peer's: its jaxlora run's)\n")
    print("| variant | step (s) | tokens/s | peak RSS (MiB) | device peak (MiB) | model GFLOP/s "
          "| matmul rate beside (GFLOP/s) | of matmul rate | compile (s) | step (s) per round |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dev = "-" if r.get("device_peak_mb") is None else f"{r['device_peak_mb']:.0f}"
        print(f"| {r['variant']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {dev} | {r['model_gflops']:.0f} | "
              f"{r['ceiling_gflops']:.0f} | {100 * r['model_gflops'] / r['ceiling_gflops']:.0f}% | "
              f"{r['compile_s']:.0f} | {', '.join(map(str, r['rounds']))} |")
    for r in rows:
        for c in r.get("kernel_choices", []):
            print(f"{r['variant']} kernel auto: [{c['m']}, {c['k']}] x [{c['k']}, {c['n']}] "
                  f"{c['dtype']}: pallas {1e3 * c['kernel_s']:.3f} ms, xla "
                  f"{1e3 * c['xla_s']:.3f} ms -> {'pallas' if c['kernel'] else 'xla'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": peak, "dtype": args.dtype, "model": args.model,
                       "rows": rows}, f, indent=1)
    for name in ("lora", "qlora"):
        if name in by and f"peft-{name}" in by:
            print(f"jaxlora / PEFT {name} tokens/s: "
                  f"{by[name]['tokens_per_s'] / by['peft-' + name]['tokens_per_s']:.2f}")
    for name in args.variants.split(","):
        other = next((r for r in rows if r["variant"].startswith(f"{name} @ ")), None)
        if other is not None and name in by:
            print(f"{name} step time, this tree / {other['variant']}: "
                  f"{by[name]['step_s'] / other['step_s']:.3f}")
    for q in QUANT_VARIANTS:
        if "lora" in by and q in by:
            print(f"\n{q} / lora step time: {by[q]['step_s'] / by['lora']['step_s']:.3f}")


if __name__ == "__main__":
    main()
