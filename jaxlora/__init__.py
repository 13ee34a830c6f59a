"""jaxlora: LoRA and QLoRA fine-tuning of language models in JAX / Flax NNX.

    import jaxlora as jl
    m = jl.io.load_model("smollm2-135m-instruct", quant=jl.QuantRules(qtype="nf4"))
    adapters = jl.lora.init(key, m.params, jl.LoraSpec(rank=8, targets="all-linear"))

The map of the library, one module per concept:

    quant       QTensor, NF4/FP4/INT4/INT8 codecs, double quantization, the size report
    kernels     the fused 4-bit dequantize-matmul (Pallas, Triton on GPU) and its dispatch
    lora        LoraSpec and target selection; the linear primitive; init / merge; NNX binding
    optim       optax optimizers that act on the adapters only
    models      the model families (Llama, GPT-2): one record each; forward and logits
    io          GGUF / safetensors loading (streaming, quantized on load), tokenizer, PEFT
    data        corpora -> packed, loss-masked, resumable batches
    train       the pure steps, the loop with hooks, run directories
    sharding    device meshes (members, data, fsdp, tensor), partition rules, multi-host
    generate    KV-cache decoding, with or without adapters
    multi       several adapters over one base, one per batch row
    population  K adapters trained at once over one base; what sweeps run
    checkpoint  Orbax checkpoints of adapters and train state; the base by fingerprint
    export      PEFT and merged exports
    config      TOML configs; sweep: sweeps of them; cli: the `jaxlora` command

Modules and names are imported on first use, so `import jaxlora` (and the command line's
config checks) do not pay for importing JAX.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_MODULES = (
    "checkpoint", "config", "data", "errors", "export", "generate", "io", "kernels", "lora",
    "memory", "models", "multi", "optim", "paths", "population", "quant", "sharding", "sweep", "train",
)
# The few names a notebook reaches for, and the module that defines each.
_NAMES = {
    "QTensor": "quant",
    "QuantRules": "quant",
    "LoraSpec": "lora",
    "ModelConfig": "models",
    "load_model": "io",
    "Config": "config",
    "load_config": "config",
    "TrainState": "train",
    "JaxloraError": "errors",
}

__all__ = [*_MODULES, *_NAMES]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"jaxlora.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"jaxlora.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'jaxlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
