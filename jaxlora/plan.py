"""The memory planner: the peak memory of a training run, from its config alone.

`plan(cfg)` predicts, before anything is loaded, what a run of `cfg` holds at its peak, term
by term, for the host's resident memory on CPU or for one accelerator's memory:

- **base**: the frozen weights as stored (float, or packed codes + block scales for a qtype;
  exact: the quantizer is traced abstractly over the shapes of the model's header);
- **adapters**, **gradients**, **optimizer**: the LoRA pairs, their gradient (summed over
  micro-batches) and the optimizer's state (exact, by abstract evaluation of the library's own
  `lora.init` and `optim.make_optimizer`), times the population size;
- **activations**: what the backward pass keeps of every block under the remat policy
  (Chen et al. 2016, "Training deep nets with sublinear memory cost": "full" keeps each block's
  input only and recomputes the rest);
- **layer**: the working set of one block while its backward runs: the block's full set of
  intermediates, recomputed or kept, with the dequantized and LoRA-merged weight of its widest
  projection (the primitive forms `W + s A B` per call, `jaxlora.lora.primitive`);
- **logits**: the loss's chunk of `[chunk, vocab]` float32 logits (their gradient is fused
  into the pull-back; the whole `[tokens, vocab]` never exists, `train.step.chunked_xent`);
- **runtime** (CPU only): the process's fixed cost, Python + jaxlib + the XLA runtime with the
  compiled programs (`RUNTIME_BYTES`, measured: `benchmarks/bench_plan.py`), and while the
  step compiles, the compiler's transient (`COMPILE_BYTES`);
- **load**: the transient of the streaming load above the base: the largest tensor as read
  (at most 2 bytes an element in a bf16/fp16 checkpoint) and in float32, or the largest
  quantized leaf while its layers are stacked, whichever is more.

Per device on a mesh: the base is split over fsdp x tensor, batch rows over data x fsdp and a
population's members over the members axis. The train step's peak is the sum of the terms; on
CPU the run's peak is the largest of it, the load's and the compile's. `estimate_bytes` of
`jaxlora.population` (which sizes populations) is this planner.

Counting the activations (per token of one block, `c` bytes per compute-dtype element, d the
width, q = heads x head_dim, kv = kv heads x head_dim, f the MLP width, R the adapter ranks of
the block's projections): the block's intermediates are 5d + 5q + 4kv + 4f elements (inputs
and outputs of the norms, projections, RoPE, attention, the SwiGLU product), R float32 `x @ A`
residuals, and the attention's scores (float32), probabilities and mask, `H x K` each, K the
keys a query's causal block reads (about T/2 + 32: `jaxlora.models.common.query_blocks`).
"none" keeps all of them in every layer; "attn" keeps x, the mid residual, k and v (2d + 2kv);
"full" and "dots" keep the block input (d; the projections are custom-VJP primitives, so
"dots" finds no dot of its own to save), and "dots" the R `x @ A` residuals too; the three
also keep the float32 RoPE tables (2 head_dim), inputs of every checkpointed block. Recomputing
a block whose k and v are kept ("attn") holds the probabilities but not the scores. These
counts were checked against XLA's buffer assignment of the compiled step
(`compile().memory_analysis()`: SmolLM2 over the four policies and 1 x 256 .. 8 x 512 within
-10% .. +17%; `tests/test_plan.py` on a small model).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

__all__ = ["RUNTIME_BYTES", "COMPILE_BYTES", "Plan", "plan", "format_plan"]

RUNTIME_BYTES = 430 * 2**20
"""The fixed host memory of a training process on CPU: Python, jaxlib, the XLA CPU runtime, the
loader's and the step's compiled programs. Measured (2-core x86-64, jax 0.10.2): a tiny-llama run
holds 199 MiB after the imports, 347 MiB once set up and 383 MiB after its steps; SmolLM2 runs
peak at 410-450 MiB above XLA's argument and temporary bytes of their compiled step (the CPU
runtime's own buffers of an execution); `benchmarks/bench_plan.py`."""

COMPILE_BYTES = 100 * 2**20
"""The compiler's transient above the runtime while the train step compiles (tiny-llama peaks
at 518 MiB there, then falls back to 369 MiB)."""

_LOGITS_COPIES = 1  # a chunk's logits; XLA fuses softmax - one-hot into the pull-back
_HIDDEN_COPIES = 4  # final hidden states: as computed, split in chunks, their gradient, the sum


class Plan(NamedTuple):
    """Predicted peak memory of a training run, term by term (bytes, per device).

    The terms from `base` to `batch` are one device's; `step` is the train step's peak and
    `peak` the run's: on CPU the host RSS (the runtime once, and every device of the mesh, as
    CPU devices share the host's memory), the larger of the step and the streaming load; on an
    accelerator the step's, in one device's memory.
    """

    platform: str  # "cpu" (host RSS) or the accelerator's platform ("gpu", "tpu")
    devices: int
    population: int
    base: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    layer: int
    logits: int
    batch: int
    runtime: int
    load: int
    host_devices: int  # devices whose memory is the host's (CPU: the mesh's; else 1)

    @property
    def device(self) -> int:
        """One device's share of the train step's peak."""
        return (self.base + self.adapters + self.gradients + self.optimizer + self.activations
                + self.layer + self.logits + self.batch)

    @property
    def step(self) -> int:
        return self.runtime + self.host_devices * self.device

    @property
    def load_peak(self) -> int:
        return self.runtime + self.host_devices * self.base + self.load

    @property
    def compile_peak(self) -> int:
        """While the step compiles: the runtime, the step's arguments and the compiler."""
        args = self.base + self.adapters + self.optimizer + self.batch
        return self.runtime + self.host_devices * args + COMPILE_BYTES

    @property
    def peak(self) -> int:
        if self.platform != "cpu":
            return self.step
        return max(self.step, self.load_peak, self.compile_peak)


def _nbytes(tree: Any) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _abstract_state(cfg: Any, mcfg: Any) -> tuple[Any, Any, Any]:
    """(base, adapters, optimizer state) of `cfg` as ShapeDtypeStructs: the library's own
    loader-side quantizer, `lora.init` and optimizer, traced over shapes only."""
    import jax
    import jax.numpy as jnp

    from jaxlora import lora, models, optim, quant
    from jaxlora.paths import unflatten_paths

    dtype = jnp.dtype(cfg.model.param_dtype)
    base = unflatten_paths({p: jax.ShapeDtypeStruct(s, dtype)
                            for p, s in models.param_shapes(mcfg).items()})
    if cfg.quant.qtype != "none":
        base = jax.eval_shape(lambda b: quant.quantize_tree(b, cfg.quant)[0], base)
    # PiSSA and LoftQ build their adapters from the base; the shapes are any init's
    shapes_only = dataclasses.replace(cfg.lora, init="kaiming")
    adapters = jax.eval_shape(lambda b: lora.init(jax.random.key(0), b, shapes_only), base)
    tx = optim.make_optimizer(cfg.optim, total_steps=cfg.train.steps)
    return base, adapters, jax.eval_shape(tx.init, adapters)


def _block_ranks(adapters: Any) -> int:
    """R: the ranks of one block's adapted projections, summed (the `x @ A` residuals)."""
    from jaxlora.paths import flatten_paths

    return sum(leaf.a.shape[-1] for path, leaf in flatten_paths(adapters).items()
               if path.startswith("layers/"))


def _widest_kernel(mcfg: Any) -> int:
    """Elements of the largest per-layer projection kernel."""
    from jaxlora import models

    return max(math.prod(s[1:]) for p, s in models.param_shapes(mcfg).items()
               if p.startswith("layers/") and p.endswith("kernel"))


def _block_bytes(mcfg: Any, c: int, ranks: int,
                 seq: int) -> tuple[int, int, int, dict[str, int]]:
    """(one block's intermediates, its attention scores with probabilities and mask, the
    probabilities alone, what each remat policy keeps) per token, in bytes."""
    from jaxlora.models import common

    d, f = mcfg.hidden_size, mcfg.intermediate_size
    q, kv = mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    # a query of a causal block reads the keys up to its block's end (`common.query_blocks`)
    keys = sum((e - s0) * e for s0, e in common.query_blocks(seq)) / seq
    attn = mcfg.num_heads * keys  # elements per token of each of scores, probabilities, mask
    scores = round(attn * (4 + c + 1))  # scores f32, probabilities, mask
    full = c * (5 * d + 5 * q + 4 * kv + 4 * f) + 4 * ranks
    rope = 2 * 4 * mcfg.head_dim  # cos and sin (float32), inputs of every checkpointed block
    kept = {"none": full + scores, "attn": c * (2 * d + 2 * kv) + rope, "full": c * d + rope,
            "dots": c * d + rope + 4 * ranks}
    return full, scores, round(attn * c), kept


def plan(cfg: Any, population: int = 1, *, mcfg: Any = None, platform: str | None = None,
         devices: int | None = None, layout: str | None = None) -> Plan:
    """The memory plan of a run of `cfg` (a `jaxlora.config.Config`), nothing loaded.

    Args:
      population: K members trained at once (`jaxlora.population`); 1 for a run alone.
      mcfg: the model's `ModelConfig` (default: read from the model file's header).
      platform: "cpu", "gpu" or "tpu" (default: JAX's default backend).
      devices: the device count the mesh spans (default: all of JAX's devices).
      layout: a population's layout, "rows" (all members' rows through the model at once)
        or "members" (one after another); default `population.default_layout()`.
    """
    import jax

    from jaxlora import io, models, quant, sharding
    from jaxlora.train.assemble import DTYPES

    mcfg = io.model_config(cfg.model.name) if mcfg is None else mcfg
    platform = platform or jax.default_backend()
    local = devices or jax.local_device_count()  # the devices of this host
    devices = devices or jax.device_count()
    sizes = sharding.mesh_sizes(cfg.sharding, devices)
    k = population
    if k > 1 and layout is None:
        from jaxlora.population.step import default_layout

        layout = default_layout()
    members_here = -(-k // sizes["members"])  # members on one device group
    base, adapters, opt = _abstract_state(cfg, mcfg)
    name = cfg.model.compute_dtype
    if name == "auto":
        name = "float32" if platform == "cpu" else "bfloat16"
    c = DTYPES[name].dtype.itemsize
    rows = -(-cfg.data.batch_size // (sizes["data"] * sizes["fsdp"]))  # a member's, per device
    if k > 1 and layout == "rows":
        rows *= members_here
    tokens, seq = rows * cfg.data.seq_len, cfg.data.seq_len
    full, scores, probs, kept = _block_bytes(mcfg, c, _block_ranks(adapters), seq)
    # recomputing a block whose k and v are kept ("attn") holds the probabilities alone
    full += scores if cfg.model.remat != "attn" else probs
    weight_shards = sizes["fsdp"] * sizes["tensor"]
    largest = max(math.prod(s[1:] if p.startswith("layers/") else s)  # tensors as read
                  for p, s in models.param_shapes(mcfg).items())
    is_q = lambda x: isinstance(x, quant.QTensor)
    stacked = max((_nbytes(q) for q in jax.tree.leaves(base, is_leaf=is_q) if is_q(q)), default=0)
    ad = _nbytes(adapters)
    return Plan(
        platform=platform, devices=devices, population=k,
        base=_nbytes(base) // weight_shards,
        adapters=members_here * ad, gradients=members_here * ad,
        optimizer=members_here * _nbytes(opt),
        activations=mcfg.num_layers * tokens * kept[cfg.model.remat],
        layer=tokens * full + 2 * c * _widest_kernel(mcfg) // sizes["tensor"]
        + _HIDDEN_COPIES * 4 * tokens * mcfg.hidden_size,
        logits=_LOGITS_COPIES * 4 * min(128, tokens) * mcfg.vocab_size,
        batch=5 * 4 * cfg.train.grad_accum * tokens,
        runtime=RUNTIME_BYTES if platform == "cpu" else 0,
        load=max((2 + 4) * largest, stacked), host_devices=local if platform == "cpu" else 1,
    )


def format_plan(p: Plan, remat: str | None = None) -> str:
    """One line per term and the peak, in MiB (what `jaxlora plan` and `jaxlora train` print)."""
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    where = "host RSS" if p.platform == "cpu" else f"{p.platform} memory"
    head = (f"memory plan ({where}; terms per device, {p.devices} device(s)"
            + (f", population {p.population}" if p.population > 1 else "") + "):")
    rows = [("base", p.base), ("adapters", p.adapters), ("gradients", p.gradients),
            ("optimizer state", p.optimizer),
            (f"activations (remat {remat})" if remat else "activations", p.activations),
            ("one block's backward", p.layer), ("loss logits chunk", p.logits),
            ("batch", p.batch)]
    if p.platform == "cpu":
        rows.append(("runtime (Python, jaxlib, XLA)", p.runtime))
    lines = [head] + [f"  {name:<32}{mib(b):>14}" for name, b in rows]
    if p.host_devices > 1:
        lines.append(f"  {f'x {p.host_devices} devices in host memory':<32}"
                     f"{mib(p.host_devices * p.device):>14}")
    lines.append(f"  {'train step peak':<32}{mib(p.step):>14}")
    if p.platform == "cpu":
        lines.append(f"  {'load peak':<32}{mib(p.load_peak):>14}")
        lines.append(f"  {'compile peak':<32}{mib(p.compile_peak):>14}")
    lines.append(f"  {'predicted peak':<32}{mib(p.peak):>14}")
    return "\n".join(lines)
