"""QLoRA's quantized base weights in JAX: NF4 / FP4 / INT4 / INT8 block-wise, double quant.

Implements the storage format of QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3),
bit-compatible with bitsandbytes 0.50 (tests/test_bnb.py). Three modules:

- `jaxlora.quant.codes`: the code tables (NF4, FP4, INT4 and bitsandbytes' 8-bit dynamic map
  of the double-quantized statistics) and `QTYPES`, the list of formats.
- `jaxlora.quant.codec`: the `QTensor` pytree, `quantize` / `dequantize` of one tensor.
- `jaxlora.quant.tree`: whole parameter trees: `QuantRules` and `select` (which leaves),
  `quantize_tree`, and `report` (bytes and bits per parameter of any partly quantized tree).

Every public name is importable from ``jaxlora.quant``, imported from its module on first use
(`jaxlora._lazy`); `QuantRules` (a config section) and `codes` import no JAX.
"""

from jaxlora import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    {
        "jaxlora.quant.codes": (
            "QTYPES", "NF4_CODE", "FP4_CODE", "INT4_CODE", "create_dynamic_map", "DYNAMIC_CODE",
        ),
        "jaxlora.quant.codec": (
            "NESTED_BLOCK", "QTensor", "quantize", "dequantize", "bits_per_param",
            "block_absmax", "pack_nibbles", "unpack_nibbles",
        ),
        "jaxlora.quant.tree": (
            "QuantRules", "QuantReport", "LeafReport", "quantize_tree", "select", "report",
        ),
    },
    submodules=("codec", "codes", "tree"),
)
