"""Block-wise 4-bit and 8-bit weight quantization: the QLoRA storage format and its codec.

Implements the NormalFloat-4 (NF4) data type and double quantization of QLoRA
(Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314,
section 3), bit-compatible with bitsandbytes' ``quantize_4bit`` (v0.50): same code tables
(`jaxlora.quant.codes`), same block-wise absmax, same nearest-code decisions at midpoints,
same nibble order (first element in the high nibble) and the same double quantization of the
absmax statistics (``offset = mean(absmax)``; ``absmax - offset`` quantized in blocks of 256
with the signed 8-bit dynamic map, one float32 scale per 256-block).

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.kernels import MODES
from jaxlora.quant.codes import BYTE_TABLES, DYNAMIC_CODE, DYNAMIC_LUT, QTYPES, TABLES

__all__ = [
    "NESTED_BLOCK",
    "QTensor",
    "quantize",
    "dequantize",
    "block_absmax",
    "bits_per_param",
    "pack_nibbles",
    "unpack_nibbles",
    "check_args",
]

Array = jax.Array

NESTED_BLOCK = 256  # bitsandbytes' block size for the double-quantized absmax


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
    ``block_size``, ``double_quant``, and ``kernel``: how a matmul meets it (one of
    `jaxlora.kernels.MODES`; a static field, so changing it retraces a jitted step).
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
    kernel: str = dataclasses.field(default="auto", metadata=dict(static=True))

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
    meta_fields=["item_shape", "orig_dtype", "qtype", "block_size", "double_quant", "kernel"],
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


def check_args(qtype: str, block_size: int, where: str) -> None:
    """Refuse (ValueError naming ``where``) a qtype not in `QTYPES` or a bad block size."""
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
    table = TABLES[qtype]
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
    idx = jnp.asarray(DYNAMIC_LUT)[grid]  # [*b, m]
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
    kernel: str = "auto",
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
      kernel: how matmuls meet the result, one of `jaxlora.kernels.MODES` (``quant.kernel``).
    Returns:
      A `QTensor` with ``shape == x.shape`` and ``dtype == x.dtype``.
    Raises:
      ValueError naming the tensor for non-float input, a bad qtype/block size or (for
      concrete input) NaN/Inf values.
    """
    where = f"quantize {name!r}" if name else "quantize"
    check_args(qtype, block_size, where)
    if kernel not in MODES:
        raise ValueError(f"{where}: unknown kernel {kernel!r}; expected one of {MODES}")
    _check_input(x, batch_dims, where)
    if math.prod(np.shape(x)[batch_dims:]) == 0:
        raise ValueError(f"{where}: cannot quantize an empty tensor of shape {np.shape(x)}")
    return _quantize_impl(
        jnp.asarray(x), qtype, int(block_size), bool(double_quant), batch_dims, kernel
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_impl(
    x: Array, qtype: str, block_size: int, double_quant: bool, batch_dims: int, kernel: str
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
        kernel,
    )


def block_absmax(q: QTensor) -> Array:
    """The float32 per-block absmax ``[*batch, nblocks]`` (undoing double quant)."""
    if q.double_quant:
        return _dequantize_dynamic(q.absmax, q.nested_absmax, q.offset)
    return q.absmax


@jax.named_scope("dequantize")
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
        pairs = jnp.asarray(BYTE_TABLES[q.qtype])[q.codes.astype(jnp.int32)]  # [*b, k, 2]
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
