"""QLoRA's quantized base weights in JAX: NF4 / FP4 / INT4 / INT8 block-wise, double quant.

Implements the storage format of QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3),
bit-compatible with bitsandbytes 0.50 (tests/test_bnb.py). Three modules:

- `jaxlora.quant.codes`: the code tables (NF4, FP4, INT4 and bitsandbytes' 8-bit dynamic map
  of the double-quantized statistics) and `QTYPES`, the list of formats.
- `jaxlora.quant.codec`: the `QTensor` pytree, `quantize` / `dequantize` of one tensor.
- `jaxlora.quant.tree`: whole parameter trees: `QuantRules` and `select` (which leaves),
  `quantize_tree`, and `report` (bytes and bits per parameter of any partly quantized tree).

Every public name is importable from ``jaxlora.quant``.
"""

from jaxlora.quant.codec import (
    NESTED_BLOCK,
    QTensor,
    bits_per_param,
    block_absmax,
    dequantize,
    pack_nibbles,
    quantize,
    unpack_nibbles,
)
from jaxlora.quant.codes import (
    DYNAMIC_CODE,
    FP4_CODE,
    INT4_CODE,
    NF4_CODE,
    QTYPES,
    create_dynamic_map,
)
from jaxlora.quant.tree import (
    LeafReport,
    QuantReport,
    QuantRules,
    quantize_tree,
    report,
    select,
)

__all__ = [
    "QTYPES",
    "NF4_CODE",
    "FP4_CODE",
    "INT4_CODE",
    "NESTED_BLOCK",
    "QTensor",
    "QuantRules",
    "QuantReport",
    "LeafReport",
    "create_dynamic_map",
    "DYNAMIC_CODE",
    "quantize",
    "dequantize",
    "quantize_tree",
    "select",
    "report",
    "bits_per_param",
    "block_absmax",
    "pack_nibbles",
    "unpack_nibbles",
]
