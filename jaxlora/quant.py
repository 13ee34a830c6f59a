"""Block-wise 4-bit and 8-bit weight quantization: the QLoRA storage format in JAX.

Implements the NormalFloat-4 (NF4) data type and double quantization of QLoRA
(Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314,
section 3), bit-compatible with bitsandbytes' ``quantize_4bit`` (v0.50): same code tables,
same block-wise absmax, same nearest-code decisions at midpoints, same nibble order (first
element in the high nibble) and the same double quantization of the absmax statistics
(``offset = mean(absmax)``; ``absmax - offset`` quantized in blocks of 256 with the signed
8-bit dynamic map, one float32 scale per 256-block).

A `QTensor` is a registered pytree: its arrays (packed codes and scales) are children, its
shape/dtype/format are static metadata, so it passes through ``jit``, ``lax.scan`` over a
stacked leading axis, ``device_put`` and Orbax like any array tree. `dequantize` is pure and
jittable; inside a jitted matmul XLA fuses it with the consumer.

Formats (``qtype``):
- ``"nf4"``: the 16 NF4 values (quantiles of N(0, 1), exact zero), 4 bits per weight.
- ``"fp4"``: bitsandbytes' FP4 (E2M1) table, codes indexed by bit pattern. Like bitsandbytes,
  values in (0, 1/384] of the absmax get code 8 (-0) and [-1/384, 0] code 0 (+0).
- ``"int4"``: symmetric absmax integers ``k / 7`` for ``k`` in -7..7 (code ``k + 8``).
- ``"int8"``: symmetric absmax integers ``k / 127`` stored as ``int8``, one code per byte.

Two documented deviations from bitsandbytes: the double-quant offset is the correctly rounded
float32 mean (torch's float32 sum can differ by 1 ulp), and an all-zero block is scaled to
zero explicitly (bitsandbytes relies on a 1e-38 clamp, a subnormal that XLA flushes to zero).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import schema
from jaxlora.paths import flatten_paths, unflatten_paths

__all__ = [
    "QTYPES",
    "NF4_CODE",
    "FP4_CODE",
    "INT4_CODE",
    "QTensor",
    "QuantRules",
    "QuantReport",
    "LeafReport",
    "create_dynamic_map",
    "DYNAMIC_CODE",
    "quantize",
    "dequantize",
    "quantize_tree",
    "bits_per_param",
    "block_absmax",
    "pack_nibbles",
    "unpack_nibbles",
]

Array = jax.Array
Params = dict  # nested dict[str, Array | QTensor]

QTYPES = ("nf4", "fp4", "int4", "int8")
NESTED_BLOCK = 256  # bitsandbytes' block size for the double-quantized absmax

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

_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}
# Per packed byte, its two values (high nibble first): one lookup decodes two codes, 2.3x
# faster than unpacking and looking up each nibble on XLA:CPU.
_BYTE_TABLES = {k: np.stack([np.repeat(t, 16), np.tile(t, 16)], axis=-1).astype(np.float32)
                for k, t in _TABLES.items()}  # [256, 2]


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
    """The formula of bitsandbytes' 8-bit dynamic (exponent + fraction) map, sorted ``[256]``.

    Same construction as ``bitsandbytes.functional.create_dynamic_map`` but in float64, so it
    is the exact map up to torch's float32 ``linspace`` rounding (<= 1 ulp); the codec uses
    the bit-exact table `DYNAMIC_CODE`, which the tests check against this formula.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        bounds = np.linspace(0.1, 1.0, n_items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10.0 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10.0 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = np.linspace(0.1, 1.0, additional_items + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10.0 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10.0 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return np.sort(np.array(data, dtype=np.float64))


# bitsandbytes' create_dynamic_map(signed=True) exactly as bitsandbytes 0.50 / torch 2.x
# (float32 linspace) produce it: the code of the double-quantized absmax (QLoRA section 3).
DYNAMIC_CODE = np.array(
    [
        -0.99296874,
        -0.9789063,
        -0.96484375,
        -0.9507812,
        -0.93671876,
        -0.92265624,
        -0.9085938,
        -0.89453125,
        -0.8804687,
        -0.86640626,
        -0.85234374,
        -0.8382813,
        -0.82421875,
        -0.8101562,
        -0.79609376,
        -0.78203124,
        -0.7679688,
        -0.75390625,
        -0.7398437,
        -0.72578126,
        -0.7117188,
        -0.6976563,
        -0.68359375,
        -0.6695312,
        -0.65546876,
        -0.6414063,
        -0.6273438,
        -0.61328125,
        -0.5992187,
        -0.58515626,
        -0.5710938,
        -0.5570313,
        -0.54296875,
        -0.5289062,
        -0.5148437,
        -0.50078124,
        -0.4867187,
        -0.47265625,
        -0.45859373,
        -0.44453126,
        -0.43046874,
        -0.41640624,
        -0.40234375,
        -0.38828123,
        -0.37421876,
        -0.36015624,
        -0.34609374,
        -0.33203125,
        -0.31796873,
        -0.30390626,
        -0.28984374,
        -0.27578127,
        -0.26171875,
        -0.24765624,
        -0.23359375,
        -0.21953125,
        -0.20546874,
        -0.19140625,
        -0.17734376,
        -0.16328125,
        -0.14921875,
        -0.13515624,
        -0.12109375,
        -0.107031256,
        -0.09859375,
        -0.09578126,
        -0.092968754,
        -0.09015625,
        -0.08734375,
        -0.08453125,
        -0.08171876,
        -0.07890625,
        -0.07609375,
        -0.07328125,
        -0.070468746,
        -0.067656256,
        -0.06484375,
        -0.06203125,
        -0.059218753,
        -0.05640625,
        -0.05359375,
        -0.05078125,
        -0.04796875,
        -0.04515625,
        -0.042343747,
        -0.03953125,
        -0.036718752,
        -0.03390625,
        -0.03109375,
        -0.028281251,
        -0.02546875,
        -0.02265625,
        -0.019843752,
        -0.01703125,
        -0.01421875,
        -0.01140625,
        -0.00971875,
        -0.009156249,
        -0.00859375,
        -0.00803125,
        -0.00746875,
        -0.00690625,
        -0.00634375,
        -0.00578125,
        -0.0052187503,
        -0.0046562497,
        -0.00409375,
        -0.0035312497,
        -0.00296875,
        -0.00240625,
        -0.00184375,
        -0.0012812499,
        -0.0009437501,
        -0.00083125,
        -0.00071875006,
        -0.0006062501,
        -0.00049375003,
        -0.00038125002,
        -0.00026875004,
        -0.00015625001,
        -8.875e-05,
        -6.625e-05,
        -4.375e-05,
        -2.1249998e-05,
        -7.75e-06,
        -3.2500002e-06,
        -5.5000004e-07,
        0.0,
        5.5000004e-07,
        3.2500002e-06,
        7.75e-06,
        2.1249998e-05,
        4.375e-05,
        6.625e-05,
        8.875e-05,
        0.00015625001,
        0.00026875004,
        0.00038125002,
        0.00049375003,
        0.0006062501,
        0.00071875006,
        0.00083125,
        0.0009437501,
        0.0012812499,
        0.00184375,
        0.00240625,
        0.00296875,
        0.0035312497,
        0.00409375,
        0.0046562497,
        0.0052187503,
        0.00578125,
        0.00634375,
        0.00690625,
        0.00746875,
        0.00803125,
        0.00859375,
        0.009156249,
        0.00971875,
        0.01140625,
        0.01421875,
        0.01703125,
        0.019843752,
        0.02265625,
        0.02546875,
        0.028281251,
        0.03109375,
        0.03390625,
        0.036718752,
        0.03953125,
        0.042343747,
        0.04515625,
        0.04796875,
        0.05078125,
        0.05359375,
        0.05640625,
        0.059218753,
        0.06203125,
        0.06484375,
        0.067656256,
        0.070468746,
        0.07328125,
        0.07609375,
        0.07890625,
        0.08171876,
        0.08453125,
        0.08734375,
        0.09015625,
        0.092968754,
        0.09578126,
        0.09859375,
        0.107031256,
        0.12109375,
        0.13515624,
        0.14921875,
        0.16328125,
        0.17734376,
        0.19140625,
        0.20546874,
        0.21953125,
        0.23359375,
        0.24765624,
        0.26171875,
        0.27578127,
        0.28984374,
        0.30390626,
        0.31796873,
        0.33203125,
        0.34609374,
        0.36015624,
        0.37421876,
        0.38828123,
        0.40234375,
        0.41640624,
        0.43046874,
        0.44453126,
        0.45859373,
        0.47265625,
        0.4867187,
        0.50078124,
        0.5148437,
        0.5289062,
        0.54296875,
        0.5570313,
        0.5710938,
        0.58515626,
        0.5992187,
        0.61328125,
        0.6273438,
        0.6414063,
        0.65546876,
        0.6695312,
        0.68359375,
        0.6976563,
        0.7117188,
        0.72578126,
        0.7398437,
        0.75390625,
        0.7679688,
        0.78203124,
        0.79609376,
        0.8101562,
        0.82421875,
        0.8382813,
        0.85234374,
        0.86640626,
        0.8804687,
        0.89453125,
        0.9085938,
        0.92265624,
        0.93671876,
        0.9507812,
        0.96484375,
        0.9789063,
        0.99296874,
        1.0,
    ],
    dtype=np.float32,
)


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


_DYNAMIC_LUT = _dynamic_lut()


# --------------------------------------------------------------------------------------------
# The pytree
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A block-wise quantized tensor (a pytree; arrays are children, format is static).

    Children:
      codes: ``uint8 [*batch, ceil(n/2)]`` packed 4-bit codes (first element in the high
        nibble, bitsandbytes layout) or ``int8 [*batch, n]`` for int8; ``n = prod(item_shape)``
        in row-major order.
      absmax: ``float32 [*batch, nblocks]``, or under double quant ``uint8 [*batch, nblocks]``
        codes into the signed dynamic map.
      nested_absmax: double quant only, ``float32 [*batch, ceil(nblocks/256)]``, else None.
      offset: double quant only, ``float32 [*batch]`` (the mean absmax), else None.
    Static: ``item_shape`` (shape of one slice), ``orig_dtype`` (numpy dtype name), ``qtype``,
    ``block_size``, ``double_quant``.
    """

    codes: Array
    absmax: Array
    nested_absmax: Array | None
    offset: Array | None
    item_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    orig_dtype: str = dataclasses.field(metadata=dict(static=True))
    qtype: str = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    double_quant: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading (stacked) dims: those of ``codes`` before its last axis."""
        return tuple(self.codes.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized array: ``batch_shape + item_shape``."""
        return self.batch_shape + tuple(self.item_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        """The original (and default dequantized) dtype."""
        return jnp.dtype(self.orig_dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (codes + statistics)."""
        return sum(
            int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
            for a in (self.codes, self.absmax, self.nested_absmax, self.offset)
            if a is not None
        )

    def __repr__(self) -> str:
        return (
            f"QTensor({self.qtype}, shape={self.shape}, dtype={self.orig_dtype}, "
            f"block_size={self.block_size}, double_quant={self.double_quant})"
        )


jax.tree_util.register_dataclass(
    QTensor,
    data_fields=["codes", "absmax", "nested_absmax", "offset"],
    meta_fields=["item_shape", "orig_dtype", "qtype", "block_size", "double_quant"],
)


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------
def pack_nibbles(q: Array) -> Array:
    """Pack 4-bit codes ``uint8 [..., m]`` (m even) into ``uint8 [..., m/2]``, first = high."""
    q = q.astype(jnp.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack_nibbles(p: Array) -> Array:
    """Inverse of `pack_nibbles`: ``uint8 [..., k]`` -> ``uint8 [..., 2k]``."""
    hi = p >> 4
    lo = p & 0xF
    return jnp.stack([hi, lo], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def _check_args(qtype: str, block_size: int, where: str) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"{where}: unknown qtype {qtype!r}; expected one of {QTYPES}")
    if (
        not isinstance(block_size, (int, np.integer))
        or isinstance(block_size, bool)
        or block_size < 32
        or block_size > 4096
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"{where}: block_size {block_size!r} must be a power of two in 32..4096")


def _check_input(x: Any, batch_dims: int, where: str) -> None:
    dt = jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"{where}: cannot quantize dtype {dt}; expected float32, bfloat16 or float16"
        )
    if dt not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"{where}: unsupported float dtype {dt}; expected float32, bfloat16 or float16"
        )
    ndim = np.ndim(x)
    if not 0 <= batch_dims <= ndim - 1 and not (ndim == 0 and batch_dims == 0):
        raise ValueError(
            f"{where}: batch_dims={batch_dims} needs at least one item dim; "
            f"got an array of rank {ndim}"
        )
    if not isinstance(x, jax.core.Tracer):
        finite = np.isfinite(np.asarray(jnp.asarray(x, jnp.float32)))
        if not finite.all():
            bad = int(np.size(finite) - np.count_nonzero(finite))
            raise ValueError(
                f"{where}: {bad} NaN/Inf value(s) in the weights; refusing to quantize"
            )


def _nearest_4bit(scaled: Array, qtype: str) -> Array:
    """Nearest code index of ``scaled`` in [-1, 1] (bitsandbytes' bucketize on midpoints).

    Ties (exactly on a midpoint) go to the lower value, as ``torch.bucketize(right=False)``.
    """
    table = _TABLES[qtype]
    order = np.argsort(table, kind="stable")  # FP4/INT4 are not sorted by index
    srt = table[order]
    mids = jnp.asarray((srt[:-1] + srt[1:]) / np.float32(2.0))  # float32 [15]
    pos = jnp.sum(scaled[..., None] > mids, axis=-1, dtype=jnp.int32)  # searchsorted left
    return jnp.asarray(order, jnp.uint8)[pos] if qtype != "nf4" else pos.astype(jnp.uint8)


def _blockwise_absmax(xb: Array, n: int, block_size: int) -> tuple[Array, Array]:
    """Absmax per block and x scaled to [-1, 1], exactly as bitsandbytes' reference op.

    ``xb``: float32 ``[*b, nblocks, block]`` (zero padded). Full blocks are scaled by
    ``x * (1 / absmax)``, a trailing partial block by ``x / absmax`` with its stored absmax
    clamped to 1e-38 (bitsandbytes' default backend does exactly this).
    """
    absmax = jnp.max(jnp.abs(xb), axis=-1)  # [*b, nblocks]
    # bitsandbytes clamps absmax to 1e-38, a float32 subnormal that XLA flushes to zero:
    # all-zero blocks are handled explicitly instead (they scale to 0, code "0.0").
    nonzero = (absmax > 0)[..., None]
    safe = jnp.where(absmax > 0, absmax, np.float32(1.0))
    scaled = jnp.where(nonzero, xb * (np.float32(1.0) / safe)[..., None], 0.0)
    if n % block_size:
        last = jnp.where(nonzero[..., -1, :], xb[..., -1, :] / safe[..., -1:], 0.0)
        scaled = scaled.at[..., -1, :].set(last)
        absmax = absmax.at[..., -1].set(jnp.maximum(absmax[..., -1], np.float32(1e-38)))
    return jnp.clip(scaled, -1.0, 1.0), absmax


def _mean(a: Array) -> Array:
    """float32 mean over the last axis with one residual correction step.

    ``jnp.mean``'s float32 reduction order differs from torch's cascade sum; correcting with
    the mean residual gives (nearly always) the correctly rounded mean, which is what torch
    produces for bitsandbytes' offset.
    """
    m = jnp.mean(a, axis=-1)
    return m + jnp.mean(a - m[..., None], axis=-1)


def _no_fma(product: Array) -> Array:
    """Keep ``product`` from being contracted with a following add into one FMA.

    XLA:CPU lets LLVM fuse ``a * b + c`` into a single-rounding FMA, while bitsandbytes rounds
    the product first; a select between them blocks the contraction (inputs here are finite;
    a NaN product would become 0).
    """
    return jnp.where(jnp.isnan(product), np.float32(0.0), product)


def _quantize_dynamic(v: Array) -> tuple[Array, Array]:
    """8-bit dynamic-map block quantization (block 256) of ``float32 [*b, m]``.

    Mirrors bitsandbytes' CPU kernel: absmax per 256-block, ``v / absmax``, then the code
    from the 16-bit grid table `_dynamic_lut`. Returns (``uint8 [*b, m]``, ``float32
    [*b, nb2]``).
    """
    m = v.shape[-1]
    nb2 = -(-m // NESTED_BLOCK)
    pad = nb2 * NESTED_BLOCK - m
    vb = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)]).reshape(*v.shape[:-1], nb2, NESTED_BLOCK)
    nabs = jnp.max(jnp.abs(vb), axis=-1)  # [*b, nb2]
    normed = (vb / nabs[..., None]).reshape(*v.shape[:-1], nb2 * NESTED_BLOCK)[..., :m]
    scaled = (jnp.clip(normed, -1.0, 1.0) + np.float32(1.0)) * np.float32(0.5)
    grid = _no_fma(scaled * np.float32(65535.0)) + np.float32(0.5)  # two roundings
    grid = jnp.clip(jnp.where(jnp.isnan(grid), 0.0, grid), 0.0, 65535.0).astype(jnp.int32)
    idx = jnp.asarray(_DYNAMIC_LUT)[grid]  # [*b, m]
    idx = jnp.where(jnp.isnan(normed), 0, idx)  # all-equal absmax: 0/0, bnb stores code 0
    return idx.astype(jnp.uint8), nabs


def _dequantize_dynamic(q: Array, nabs: Array, offset: Array) -> Array:
    """Inverse of `_quantize_dynamic` plus the offset: ``float32 [*b, m]`` absmax."""
    m = q.shape[-1]
    vals = jnp.asarray(DYNAMIC_CODE)[q.astype(jnp.int32)]
    scale = jnp.repeat(nabs, NESTED_BLOCK, axis=-1)[..., :m]
    return _no_fma(vals * scale) + offset[..., None]  # two roundings, as bitsandbytes


# --------------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------------
def quantize(
    x: Any,
    qtype: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    *,
    batch_dims: int = 0,
    name: str | None = None,
) -> QTensor:
    """Quantize ``x [*batch, *item]`` block-wise; each leading ``batch`` slice independently.

    Args:
      x: float32/bfloat16/float16 array. The item part is flattened row-major, padded to a
        multiple of ``block_size`` and quantized with one absmax per block.
      qtype: "nf4" | "fp4" | "int4" | "int8".
      block_size: power of two in 32..4096 (bitsandbytes' range); default 64.
      double_quant: quantize the absmax statistics again (QLoRA DQ, bitsandbytes
        ``compress_statistics``): 8-bit dynamic codes, block 256, plus a float32 offset.
      batch_dims: number of leading stacked axes (e.g. 1 for ``[L, in, out]`` kernels).
        Quantizing the stack equals quantizing each slice and stacking.
      name: the tensor's name/path, used in error messages.
    Returns:
      A `QTensor` with ``shape == x.shape`` and ``dtype == x.dtype``.
    Raises:
      ValueError naming the tensor for non-float input, a bad qtype/block size or (for
      concrete input) NaN/Inf values.
    """
    where = f"quantize {name!r}" if name else "quantize"
    _check_args(qtype, block_size, where)
    _check_input(x, batch_dims, where)
    if math.prod(np.shape(x)[batch_dims:]) == 0:
        raise ValueError(f"{where}: cannot quantize an empty tensor of shape {np.shape(x)}")
    return _quantize_impl(jnp.asarray(x), qtype, int(block_size), bool(double_quant), batch_dims)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_impl(
    x: Array, qtype: str, block_size: int, double_quant: bool, batch_dims: int
) -> QTensor:
    """The jitted codec behind `quantize` (one compiled program per shape and format)."""
    orig_dtype = jnp.dtype(x.dtype).name
    batch, item = x.shape[:batch_dims], x.shape[batch_dims:]
    n = math.prod(item)
    nblocks = -(-n // block_size)
    flat = x.astype(jnp.float32).reshape(*batch, n)
    xb = jnp.pad(flat, [(0, 0)] * batch_dims + [(0, nblocks * block_size - n)])
    xb = xb.reshape(*batch, nblocks, block_size)  # [*b, nblocks, block]
    if qtype == "int8":
        absmax = jnp.max(jnp.abs(xb), axis=-1)
        safe = jnp.where(absmax > 0, absmax, np.float32(1.0))  # all-zero block -> codes 0
        q = jnp.round(xb / safe[..., None] * np.float32(127.0))
        codes = q.astype(jnp.int8).reshape(*batch, nblocks * block_size)[..., :n]
    else:
        scaled, absmax = _blockwise_absmax(xb, n, block_size)
        q = _nearest_4bit(scaled, qtype).reshape(*batch, nblocks * block_size)
        codes = pack_nibbles(q[..., : n + (n % 2)])  # [*b, ceil(n/2)]
    nested = offset = None
    if double_quant:
        offset = _mean(absmax)  # [*b]
        absmax, nested = _quantize_dynamic(absmax - offset[..., None])
    return QTensor(
        codes,
        absmax,
        nested,
        offset,
        tuple(int(d) for d in item),
        orig_dtype,
        qtype,
        int(block_size),
        bool(double_quant),
    )


def block_absmax(q: QTensor) -> Array:
    """The float32 per-block absmax ``[*batch, nblocks]`` (undoing double quant)."""
    if q.double_quant:
        return _dequantize_dynamic(q.absmax, q.nested_absmax, q.offset)
    return q.absmax


def dequantize(q: QTensor, dtype: Any = None) -> Array:
    """Dequantize to ``[*batch, *item_shape]`` in ``dtype`` (default: the original dtype).

    Pure and jittable: a table lookup of the codes times the block absmax (float32 math,
    like bitsandbytes), then a cast.
    """
    return _dequantize_impl(q, q.dtype if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize_impl(q: QTensor, dtype: np.dtype) -> Array:
    """The jitted body of `dequantize` (inlined when called under an outer jit)."""
    batch = q.batch_shape
    n = math.prod(q.item_shape)
    nblocks = -(-n // q.block_size)
    if q.qtype == "int8":
        vals = q.codes.astype(jnp.float32) / np.float32(127.0)  # [*b, n]
    else:
        pairs = jnp.asarray(_BYTE_TABLES[q.qtype])[q.codes.astype(jnp.int32)]  # [*b, k, 2]
        vals = pairs.reshape(*batch, -1)[..., :n]  # [*b, n]
    vals = jnp.pad(vals, [(0, 0)] * len(batch) + [(0, nblocks * q.block_size - n)])
    vals = vals.reshape(*batch, nblocks, q.block_size)
    out = vals * block_absmax(q)[..., None]
    return out.reshape(*batch, nblocks * q.block_size)[..., :n].reshape(q.shape).astype(dtype)


def bits_per_param(q: QTensor) -> float:
    """Stored bits per parameter, from the bytes of the stored arrays.

    The packing pad (one nibble for odd sizes) and the partial-block statistics count, so
    for large tensors this is 4.5 (nf4, block 64) or 4.127 (nf4 + double quant).
    """
    return 8.0 * q.nbytes / q.size


# --------------------------------------------------------------------------------------------
# Whole parameter trees
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantRules:
    """How the frozen base weights are quantized on load (QLoRA): which leaves, and how.

    Static, resolved outside jit; the ``[quant]`` table of a config file. Paths are the
    tree's keys joined by '/', e.g. ``layers/attn/q_proj/kernel``.
    """

    qtype: str = schema.field(
        "nf4", "Quantization of base weights: nf4, fp4, int4, int8, or none (keep float).",
        choices=(*QTYPES, "none"),
    )
    block_size: int = schema.field(
        64, "Elements per quantization block (one absmax scale each); power of two in 32..4096.",
        check=lambda v: _check_args(QTYPES[0], v, "QuantRules"),
    )
    double_quant: bool = schema.field(
        True, "Quantize the per-block absmax scales to 8 bits as well (QLoRA double quantization)."
    )
    include: str = schema.field(
        r"(^|/)kernel$", "Regex (re.search) over parameter paths of the leaves to quantize.",
        regex=True,
    )
    exclude: str = schema.field(
        r"(^|/)(embed|embedding|wte|wpe|lm_head)(/|$)|norm|(^|/)ln_|(^|/)bias$|scale$",
        "Regex over parameter paths kept in float even if included (embeddings, head, norms).",
        regex=True,
    )
    stacked: str = schema.field(
        r"^layers/", "Regex of stacked leaves (leading layer axis), quantized per layer.",
        toml=False,
    )


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One leaf: its path, shape, how it is stored and the stored bytes."""

    path: str
    shape: tuple[int, ...]
    stored: str  # the qtype, or the float dtype name when left float
    params: int
    nbytes: int

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / max(self.params, 1)


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """Bytes and bits per parameter of a (partly) quantized tree: per leaf and in total."""

    leaves: tuple[LeafReport, ...]

    def _sum(self, quantized: bool | None, field: str) -> int:
        return sum(
            getattr(leaf, field)
            for leaf in self.leaves
            if quantized is None or (leaf.stored in QTYPES) == quantized
        )

    @property
    def quantized_params(self) -> int:
        return self._sum(True, "params")

    @property
    def quantized_bytes(self) -> int:
        return self._sum(True, "nbytes")

    @property
    def float_params(self) -> int:
        return self._sum(False, "params")

    @property
    def float_bytes(self) -> int:
        return self._sum(False, "nbytes")

    @property
    def total_params(self) -> int:
        return self._sum(None, "params")

    @property
    def total_bytes(self) -> int:
        return self._sum(None, "nbytes")

    @property
    def quantized_bits_per_param(self) -> float:
        return 8.0 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.total_bytes / max(self.total_params, 1)

    def table(self) -> str:
        """A Markdown table: one row per leaf, then the totals."""
        rows = [
            "| path | shape | stored | params | bytes | bits/param |",
            "|---|---|---|---:|---:|---:|",
        ]
        for leaf in self.leaves:
            rows.append(
                f"| {leaf.path} | {list(leaf.shape)} | {leaf.stored} | {leaf.params} | "
                f"{leaf.nbytes} | {leaf.bits_per_param:.3f} |"
            )
        rows.append(
            f"| **quantized** | | | {self.quantized_params} | {self.quantized_bytes} |"
            f" {self.quantized_bits_per_param:.3f} |"
        )
        rows.append(
            f"| **total** | | | {self.total_params} | {self.total_bytes} | "
            f"{self.bits_per_param:.3f} |"
        )
        return "\n".join(rows)


def quantize_tree(params: Params, rules: QuantRules = QuantRules()) -> tuple[Params, QuantReport]:
    """Quantize the leaves of ``params`` selected by ``rules``; return (new tree, report).

    Leaves matching ``rules.include`` and not ``rules.exclude`` are quantized; those matching
    ``rules.stacked`` keep their leading layer axis (``batch_dims=1``). Other leaves are
    returned unchanged. All leaves are validated before any result is returned, so an error
    (a ValueError naming the path) never leaves a half-quantized tree. Call outside jit.
    """
    if rules.qtype != "none":
        _check_args(rules.qtype, rules.block_size, "QuantRules")
    inc, exc, stk = (
        re.compile(rules.include),
        re.compile(rules.exclude),
        re.compile(rules.stacked),
    )
    flat = flatten_paths(params)
    out: dict[str, Any] = {}
    leaves = []
    for path, leaf in flat.items():
        selected = (
            rules.qtype != "none"
            and isinstance(leaf, (jax.Array, np.ndarray))
            and inc.search(path) is not None
            and exc.search(path) is None
        )
        if selected:
            bd = 1 if stk.search(path) else 0
            if np.ndim(leaf) < bd + 1:
                raise ValueError(
                    f"quantize {path!r}: stacked leaf needs rank >= 2, got shape {np.shape(leaf)}"
                )
            q = quantize(
                leaf, rules.qtype, rules.block_size, rules.double_quant, batch_dims=bd, name=path
            )
            out[path] = q
            leaves.append(LeafReport(path, q.shape, rules.qtype, q.size, q.nbytes))
        else:
            out[path] = leaf
            if isinstance(leaf, QTensor):
                leaves.append(LeafReport(path, leaf.shape, leaf.qtype, leaf.size, leaf.nbytes))
            elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                nb = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
                leaves.append(
                    LeafReport(
                        path,
                        tuple(leaf.shape),
                        jnp.dtype(leaf.dtype).name,
                        int(np.prod(leaf.shape)),
                        nb,
                    )
                )
    return unflatten_paths(out), QuantReport(tuple(leaves))
