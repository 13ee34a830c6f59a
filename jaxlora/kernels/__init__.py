"""Fused kernels for accelerators: the 4-bit dequantize-matmul of QLoRA's frozen base.

- `jaxlora.kernels.nf4_matmul`: the Pallas kernels (Triton backend on GPU, interpret mode
  elsewhere) of ``x @ dequantize(Wq)`` and its input gradient, `qmatmul` (a custom VJP).
- `jaxlora.kernels.dispatch`: which path a `QTensor` base takes, from its ``kernel`` mode
  (`MODES`, the ``quant.kernel`` config key): `choose` and `apply`, which
  `jaxlora.lora.primitive` calls, and the per-shape measurements behind ``"auto"``.

`MODES` imports no JAX (config validation); the other names load their module on first use.
"""

from jaxlora import _lazy

MODES = ("auto", "xla", "pallas")
"""How a QTensor base meets its input: "xla" dequantizes and lets XLA contract; "pallas" uses
the fused kernel (interpret mode off GPU: for tests); "auto" the kernel on GPU where a one-time
measurement per shape finds it faster, XLA elsewhere."""

__getattr__, __dir__, _names = _lazy.attach(
    __name__,
    {
        "jaxlora.kernels.nf4_matmul": ("Tiles", "tiles_for", "decode_tile", "qmatmul"),
        "jaxlora.kernels.dispatch": ("choose", "apply", "measure", "auto_choices"),
    },
    submodules=("nf4_matmul", "dispatch"),
)
__all__ = ["MODES", *_names]
