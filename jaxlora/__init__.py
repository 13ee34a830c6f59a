"""jaxlora: LoRA and QLoRA fine-tuning of language models in JAX / Flax NNX."""

__version__ = "0.1.0"
