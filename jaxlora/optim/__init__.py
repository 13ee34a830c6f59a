"""Optax transformations for training LoRA adapters only.

LoRA (Hu et al. 2021, arXiv 2106.09685) trains the low-rank factors A, B and keeps the base
frozen; rsLoRA (arXiv 2312.03732) only changes the scale. So the optimizer here acts on the
adapter tree. When users hand a combined tree (``{"base": ..., "adapters": ...}`` or an
`lora.attach`-ed tree of `LoraWeight` views) `adapters_only` composes ``optax.partition``
with ``optax.set_to_zero`` (the optax freezing idiom): frozen leaves get zero updates and
carry no optimizer state, and gradient clipping / weight decay see the adapters only.

Modules: `jaxlora.optim.spec` (`OptimSpec`, no JAX) and `jaxlora.optim.transforms` (the optax
transformations); names are imported from them on first use (`jaxlora._lazy`).
"""

from jaxlora import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    {
        "jaxlora.optim.transforms": (
            "TRAINABLE", "FROZEN", "make_schedule", "make_optimizer", "optax_optimizer",
            "adapter_labels", "adapters_only", "lora_plus_labels",
        ),
        "jaxlora.optim.spec": ("OptimSpec",),
    },
    submodules=("spec", "transforms"),
)
