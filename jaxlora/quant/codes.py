"""The code tables of the quantization formats, as bitsandbytes defines them.

- ``NF4_CODE``: NormalFloat-4, the 16 quantiles of N(0, 1) with an exact zero, QLoRA
  (Dettmers et al. 2023, arXiv 2305.14314) section 3; bitsandbytes ``get_4bit_type("nf4")``.
- ``FP4_CODE``: bitsandbytes' FP4 (E2M1) table ``get_4bit_type("fp4")``, indexed by bit pattern.
- ``INT4_CODE``: symmetric absmax integers ``k / 7``.
- ``DYNAMIC_CODE``: bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map``), the code
  of QLoRA's double-quantized absmax statistics. Built here by `create_dynamic_map`;
  tests/test_bnb.py checks it bit for bit against the values bitsandbytes 0.50 produces.

numpy only: these are constants the jitted codec closes over.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

__all__ = [
    "QTYPES",
    "NF4_CODE",
    "FP4_CODE",
    "INT4_CODE",
    "create_dynamic_map",
    "DYNAMIC_CODE",
    "TABLES",
    "BYTE_TABLES",
    "DYNAMIC_LUT",
]

QTYPES = ("nf4", "fp4", "int4", "int8")
"""The quantization formats (`QuantRules.qtype` also takes "none": keep the tree float)."""

# bitsandbytes get_4bit_type("nf4"), index 0..15 (sorted, so index order == value order).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# bitsandbytes get_4bit_type("fp4"): E2M1 values by bit pattern, normalised by 12.
FP4_CODE = (
    np.array(
        [0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32
    )
    / np.float32(12.0)
).astype(np.float32)
# int4: code c holds (c - 8) / 7; code 0 (-8/7) is never produced by quantize.
INT4_CODE = ((np.arange(16, dtype=np.float32) - 8.0) / np.float32(7.0)).astype(np.float32)

TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}  # the 4-bit formats
# Per packed byte, its two values (high nibble first): one lookup decodes two codes, 2.3x
# faster than unpacking and looking up each nibble on XLA:CPU.
BYTE_TABLES = {
    k: np.stack([np.repeat(t, 16), np.tile(t, 16)], axis=-1).astype(np.float32)
    for k, t in TABLES.items()
}  # [256, 2]


def _fma32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """``a * b + c`` rounded once to float32 (a fused multiply-add), computed exactly."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    r = np.float32(float(exact))  # float64, then float32: may round twice ...
    for nb in (np.nextafter(r, np.float32(-np.inf)), np.nextafter(r, np.float32(np.inf))):
        if abs(Fraction(float(nb)) - exact) < abs(Fraction(float(r)) - exact):
            r = nb  # ... so step to the neighbour that is nearer
    return r


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch's float32 ``linspace(start, end, steps)`` on CPU, bit for bit: ``float32 [steps]``.

    The first half counts up from ``start``, the second down from ``end`` (as torch's kernel
    does), each point ``start + step * i`` rounded once (a fused multiply-add): that is what
    reproduces torch's values; rounding the product first changes 42 of the 256 values of
    `DYNAMIC_CODE` by 1 ulp.
    """
    s, e = np.float32(start), np.float32(end)
    step = np.float32((e - s) / np.float32(steps - 1))
    up = [_fma32(step, np.float32(i), s) for i in range(steps // 2)]
    down = [_fma32(-step, np.float32(k), e) for k in reversed(range(steps - steps // 2))]
    return np.array(up + down, dtype=np.float32)


def _dynamic_segment(n_items: int, exponent: int, signed: bool) -> list[float]:
    """One exponent's values: the midpoints of ``linspace(0.1, 1, n_items)`` times ``10**e``."""
    bounds = _linspace32(0.1, 1.0, n_items)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)  # float32 [n_items - 1]
    scale = np.float32(10.0**exponent)  # torch casts the Python scalar to float32
    out = (scale * means).tolist()
    return out + (-scale * means).tolist() if signed else out


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic (exponent + fraction) quantization map, sorted ``float32 [256]``.

    The construction of ``bitsandbytes.functional.create_dynamic_map`` (Dettmers 2016, "8-Bit
    Approximations for Parallelism in Deep Learning", arXiv 1511.04561): for each exponent
    ``10**(i - max_exponent_bits + 1)`` the midpoints of a linear fraction grid on [0.1, 1]
    whose size doubles with ``i``, plus 0 and 1, padded with zeros to 256 entries. The float32
    arithmetic follows torch's (`_linspace32`, float32 scaling), so the signed default is
    bitsandbytes' table exactly: the code of QLoRA's double-quantized absmax (arXiv 2305.14314,
    section 3).
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1  # bitsandbytes: `total_bits - (1 if signed else 1)`
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n_items = int(2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1)
        data += _dynamic_segment(n_items, i - max_exponent_bits + 1, signed)
    if additional_items > 0:  # the last exponent again (bitsandbytes reuses the loop's `i`)
        data += _dynamic_segment(additional_items + 1, i - max_exponent_bits + 1, signed)
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return np.sort(np.array(data, dtype=np.float32))


DYNAMIC_CODE = create_dynamic_map(signed=True)
"""``float32 [256]``: bitsandbytes' signed dynamic map, the code of the double-quantized absmax."""


def _dynamic_lut() -> np.ndarray:
    """``uint8 [65536]``: nearest `DYNAMIC_CODE` index of each point of a 16-bit grid on [-1, 1].

    bitsandbytes 0.50's CPU ``quantize_blockwise`` (used for the double-quantized absmax)
    does not search the map exactly: it maps ``v`` in [-1, 1] to the grid index
    ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` (float32) and looks the code up in such a
    table. We reproduce that bit for bit (checked against bitsandbytes on ~52k values and
    the test fixtures); it differs from the exact nearest code only very close to midpoints.
    """
    grid = np.arange(65536, dtype=np.float64) / 65535.0 * 2.0 - 1.0
    code = DYNAMIC_CODE.astype(np.float64)
    left = np.clip(np.searchsorted(code, grid, side="right") - 1, 0, 255)
    right = np.minimum(left + 1, 255)
    closer = np.abs(grid - code[right]) < np.abs(grid - code[left])
    return np.where(closer, right, left).astype(np.uint8)


DYNAMIC_LUT = _dynamic_lut()  # [65536]
