"""A fused 4-bit dequantize-matmul in Pallas: ``x @ dequantize(Wq)`` without a dense ``W``.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv
2305.14314, section 3) keeps the frozen base in NF4 and dequantizes it to the compute dtype
for every matmul. The XLA path (`jaxlora.lora.primitive`) writes the dequantized weight to
memory and reads it back for the contraction; these kernels decode a tile of packed codes in
registers right before the tile's dot, as bitsandbytes' CUDA kernels and the Triton "W4A16"
GEMMs do, so a weight costs half a byte per element of memory traffic instead of the 0.5-byte
read plus a 2-byte write and a 2-byte read.

Layout (`jaxlora.quant.codec`): one weight ``W [K, N]`` (``in, out``) is stored row-major as
``codes uint8 [K * N / 2]`` (element ``2j`` in the high nibble of byte ``j``) with one float32
absmax per ``block_size`` consecutive elements. When ``N`` is a multiple of the block size, a
block never straddles rows, so the codes reshape to ``[K, N / 2]`` and the scales to
``[K, N / block_size]`` and a ``[bk, bn]`` tile of ``W`` is a ``[bk, bn / 2]`` tile of codes and
a ``[bk, bn / block_size]`` tile of scales. Double-quantized scales are decoded beforehand by
XLA (``quant.block_absmax``, 1/64 of the weight's elements): a 256-entry lookup has no cheap
Triton form, a 16-entry one does (a tree of 15 selects).

`qmatmul` is a custom VJP: the base is frozen, so its backward computes only the input
gradient ``dx = dy @ W^T``, with a second kernel that decodes the same tiles again (the
residuals are the packed codes and the scales, never a dense ``W``).

One kernel body serves both backends: on GPU it lowers through Pallas' Triton backend (tile
shapes are powers of two, loads ``[bm, bk]`` / ``[bk, bn / 2]``, the K (or N) reduction a loop
inside the kernel since Triton's grid is parallel); elsewhere it runs in Pallas interpret
mode, which is how the tests check it against the XLA path on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxlora.quant.codes import TABLES

__all__ = ["Tiles", "tiles_for", "decode_tile", "qmatmul"]

Array = jax.Array

_MAX_BM = 128  # rows of x per program (each program decodes its W strip once: fewer, larger)
_MAX_BN = 128  # output columns per program (a multiple of the quant block)
_MAX_BK = 64  # reduction tile
_MIN_DOT = 16  # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Static tile sizes and format of one ``[M, K] x [K, N]`` product (hashable).

    Attributes:
      bm: rows of ``x`` per program; ``M`` is padded to a multiple of it.
      bn: columns of ``W`` per tile, a power of two and a multiple of ``block_size``.
      bk: rows of ``W`` per tile, a power of two dividing ``K``.
      qtype: "nf4" | "fp4" | "int4" (a 16-entry code table).
      block_size: elements per absmax scale.
      interpret: run in Pallas interpret mode (any backend but GPU).
      warps: Triton warps per program (8 for a 128 x 128 accumulator, else 4).
    """

    bm: int
    bn: int
    bk: int
    qtype: str
    block_size: int
    interpret: bool
    warps: int = 4


def _pow2_tile(n: int, cap: int, floor: int) -> int | None:
    """The largest power of two ``<= cap`` dividing ``n``, if it is ``>= floor``."""
    t = cap
    while t >= floor:
        if n % t == 0:
            return t
        t //= 2
    return None


def tiles_for(m: int, k: int, n: int, qtype: str, block_size: int,
              interpret: bool) -> Tiles | None:
    """Tiles for ``x [m, k] @ W [k, n]``, or None when the kernel cannot take the shape.

    The kernel needs a 4-bit format, ``n`` a multiple of a power-of-two tile of at most 128
    that is itself a multiple of ``block_size`` (so that scale blocks never straddle rows of
    ``W``) and ``k`` a multiple of a power-of-two tile of at least 16 (Triton's smallest dot).
    """
    if qtype not in TABLES:
        return None
    bn = _pow2_tile(n, _MAX_BN, block_size)  # None for blocks over 128 elements too
    bk = _pow2_tile(k, _MAX_BK, _MIN_DOT)
    if bn is None or bk is None:
        return None
    bm = max(_MIN_DOT, min(_MAX_BM, pl.next_power_of_2(max(m, 1))))
    return Tiles(bm, bn, bk, qtype, block_size, interpret, 8 if bm * bn >= 128 * 128 else 4)


def _lookup(idx: Array, table: np.ndarray) -> Array:
    """``table[idx]`` for int32 codes in 0..15 as a tree of 15 selects (no gather: Triton)."""
    vals: list = [np.float32(v) for v in table]
    for bit in range(4):
        on = ((idx >> bit) & 1) == 1
        vals = [jnp.where(on, vals[2 * i + 1], vals[2 * i]) for i in range(len(vals) // 2)]
    return vals[0]


def decode_tile(codes: Array, scales: Array, qtype: str, block_size: int, dtype) -> Array:
    """One tile of ``W``: ``codes uint8 [bk, bn/2]``, ``scales f32 [bk, bn/bs]`` -> ``[bk, bn]``.

    The same float32 math as `jaxlora.quant.dequantize` (code value times block absmax, then
    the cast to ``dtype``), so the tile equals the XLA path's dequantized weight bit for bit.
    """
    bk, half = codes.shape
    bn = 2 * half
    c = codes.astype(jnp.int32)
    hi = _lookup(c >> 4, TABLES[qtype])  # [bk, bn/2] elements 2j
    lo = _lookup(c & 15, TABLES[qtype])  # elements 2j + 1
    vals = jnp.stack([hi, lo], axis=-1).reshape(bk, bn)  # interleave (Triton: join + reshape)
    w = vals.reshape(bk, bn // block_size, block_size) * scales[:, :, None]
    return w.reshape(bk, bn).astype(dtype)


def _fwd_kernel(x_ref, codes_ref, scales_ref, o_ref, *, t: Tiles):
    """One ``[bm, bn]`` output tile: loop over K in ``bk`` steps (x ``[bm, K]`` block)."""
    k = x_ref.shape[1]

    def body(i, acc):
        x = x_ref[:, pl.ds(i * t.bk, t.bk)]  # [bm, bk]
        w = decode_tile(codes_ref[pl.ds(i * t.bk, t.bk), :],  # [bk, bn/2]
                        scales_ref[pl.ds(i * t.bk, t.bk), :],  # [bk, bn/bs]
                        t.qtype, t.block_size, x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k // t.bk, body, jnp.zeros((t.bm, t.bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dx_kernel(dy_ref, codes_ref, scales_ref, o_ref, *, t: Tiles):
    """One ``[bm, bk]`` tile of ``dx = dy @ W^T``: loop over N in ``bn`` steps."""
    n = dy_ref.shape[1]
    sb = t.bn // t.block_size

    def body(j, acc):
        dy = dy_ref[:, pl.ds(j * t.bn, t.bn)]  # [bm, bn]
        w = decode_tile(codes_ref[:, pl.ds(j * (t.bn // 2), t.bn // 2)],  # [bk, bn/2]
                        scales_ref[:, pl.ds(j * sb, sb)],  # [bk, bn/bs]
                        t.qtype, t.block_size, dy.dtype)
        return acc + jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n // t.bn, body, jnp.zeros((t.bm, t.bk), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _call(kernel, name: str, lhs: Array, codes: Array, scales: Array, t: Tiles, out: int,
          tile: int, specs: tuple) -> Array:
    """One `pallas_call` over ``[M, out]`` in ``[t.bm, tile]`` output tiles, taking the
    ``lhs`` rows, the codes and the scales by the block `specs`."""
    m = lhs.shape[0]
    return pl.pallas_call(
        functools.partial(kernel, t=t),
        out_shape=jax.ShapeDtypeStruct((m, out), lhs.dtype),
        grid=(m // t.bm, out // tile),
        in_specs=list(specs),
        out_specs=pl.BlockSpec((t.bm, tile), lambda i, j: (i, j)),
        interpret=t.interpret,
        compiler_params=plt.CompilerParams(num_warps=t.warps, num_stages=3),
        name=name,
    )(lhs, codes, scales)


def _forward(x: Array, codes: Array, scales: Array, t: Tiles) -> Array:
    """``x [M, K] @ W [K, N]`` with ``M`` a multiple of ``t.bm``."""
    k, n = x.shape[1], 2 * codes.shape[1]
    return _call(_fwd_kernel, "qmatmul_fwd", x, codes, scales, t, n, t.bn, (
        pl.BlockSpec((t.bm, k), lambda i, j: (i, 0)),
        pl.BlockSpec((k, t.bn // 2), lambda i, j: (0, j)),
        pl.BlockSpec((k, t.bn // t.block_size), lambda i, j: (0, j))))


def _input_grad(dy: Array, codes: Array, scales: Array, t: Tiles) -> Array:
    """``dy [M, N] @ W^T -> [M, K]`` with ``M`` a multiple of ``t.bm``."""
    n, k = dy.shape[1], codes.shape[0]
    return _call(_dx_kernel, "qmatmul_dx", dy, codes, scales, t, k, t.bk, (
        pl.BlockSpec((t.bm, n), lambda i, j: (i, 0)),
        pl.BlockSpec((t.bk, n // 2), lambda i, j: (j, 0)),
        pl.BlockSpec((t.bk, n // t.block_size), lambda i, j: (j, 0))))


def _pad_rows(a: Array, bm: int) -> Array:
    """``a [M, c]`` zero-padded to ``[ceil(M / bm) * bm, c]``."""
    pad = -a.shape[0] % bm
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _qmatmul2(x: Array, codes: Array, scales: Array, t: Tiles) -> Array:
    """``x [M, K] @ W [K, N]`` for any ``M`` (rows padded to the tile, then dropped)."""
    return _forward(_pad_rows(x, t.bm), codes, scales, t)[: x.shape[0]]


def _qmatmul2_fwd(x, codes, scales, t):
    # Residuals: the packed codes and the scales only (no x: the weight gets no gradient).
    return _qmatmul2(x, codes, scales, t), (codes, scales, x.shape[0])


def _qmatmul2_bwd(t, res, dy):
    codes, scales, m = res
    dx = _input_grad(_pad_rows(dy, t.bm), codes, scales, t)[:m]  # [M, K]
    # The base is frozen: zero cotangents for its arrays (float0 for the integer codes).
    return dx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scales)


_qmatmul2.defvjp(_qmatmul2_fwd, _qmatmul2_bwd)


def qmatmul(x: Array, codes: Array, scales: Array, t: Tiles) -> Array:
    """``x [..., K] @ W [K, N] -> [..., N]`` in ``x.dtype``, ``W`` decoded tile by tile.

    Args:
      x: ``[..., K]`` float32, bfloat16 or float16 activations (the compute dtype).
      codes: ``uint8 [K, N/2]``, the packed 4-bit codes of one weight (a `QTensor`'s codes
        reshaped; see the module docstring).
      scales: ``float32 [K, N/block_size]``, the decoded block absmax.
      t: the `Tiles` of `tiles_for` for this shape.

    Returns:
      ``[..., N]``. Differentiable in ``x`` only (custom VJP, dx by the transposed kernel).
    """
    lead = x.shape[:-1]
    y = _qmatmul2(x.reshape(math.prod(lead), x.shape[-1]), codes, scales, t)  # [M, N]
    return y.reshape(*lead, y.shape[-1])
