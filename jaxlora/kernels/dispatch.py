"""Which path a quantized base matmul takes: XLA's dequantize-then-dot or the fused kernel.

A `QTensor` carries its ``kernel`` mode (static, from ``quant.kernel``; `MODES`):

- ``"xla"``: never the kernel.
- ``"pallas"``: always the kernel (`jaxlora.kernels.nf4_matmul`); off GPU it runs in Pallas
  interpret mode, which is slow and meant for tests. A weight the kernel cannot take (int8,
  a stacked leaf used unscanned, a width that is no multiple of a power-of-two tile of the
  quant block) is refused with a one-line error, never silently sent to XLA.
- ``"auto"`` (the default): XLA except on a single GPU, where the first trace of each product
  shape times the kernel against the XLA path (forward and input gradient, on random data of
  that shape) and keeps the faster; the answers are cached for the process (`auto_choices`),
  like XLA's own autotuning results. With several devices it stays on XLA: a Pallas call is
  not partitioned by XLA's sharding propagation, so on a mesh its operands would be gathered.

`choose` is called at trace time by `jaxlora.lora.primitive` for every QTensor contraction
``x [..., K] . W [K, *out]``; `apply` then runs the kernel on the QTensor's arrays.
"""

from __future__ import annotations

import concurrent.futures
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlora.kernels.nf4_matmul import Tiles, qmatmul, tiles_for

__all__ = ["choose", "apply", "measure", "auto_choices"]

Array = jax.Array
XlaMatmul = Callable[[Array, object], Array]
"""The XLA path being replaced: ``(x [..., K], QTensor) -> [..., N]`` (differentiable in x)."""

_AUTO: dict[tuple, tuple[bool, float, float]] = {}  # shape key -> (kernel?, kernel s, xla s)


def _platform() -> str:
    """The backend the program is traced for ("cpu", "gpu", "tpu"), or "gpu-mesh" when there
    are several GPUs (where "auto" keeps XLA)."""
    backend = jax.default_backend()
    return "gpu-mesh" if backend == "gpu" and jax.device_count() > 1 else backend


def _geometry(q, x_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(M, K, N)`` of ``x [..., K] . W [K, *out]``, or None for a stacked (unsliced) leaf."""
    if q.batch_shape or len(q.item_shape) < 2 or x_shape[-1] != q.item_shape[0]:
        return None
    return math.prod(x_shape[:-1]), q.item_shape[0], math.prod(q.item_shape[1:])


def choose(q, x: Array, xla: XlaMatmul) -> Tiles | None:
    """The kernel's tiles if ``x . q`` should run through the kernel, else None (XLA path).

    Args:
      q: the `QTensor` base weight ``[K, *out]`` (its ``kernel`` field is the mode).
      x: the input ``[..., K]`` (a tracer is fine: only its shape and dtype are read).
      xla: the XLA path, timed against the kernel under ``"auto"`` on GPU.
    Raises:
      ValueError (one line: shape, format, reason) when the mode is "pallas" and the kernel
      cannot take this weight.
    """
    if q.kernel == "xla" or (q.kernel == "auto" and _platform() != "gpu"):
        return None
    geo = _geometry(q, tuple(x.shape))
    tiles = None
    if geo is not None:
        tiles = tiles_for(*geo, q.qtype, q.block_size, interpret=jax.default_backend() != "gpu")
    if q.kernel == "pallas":
        if tiles is None:
            raise ValueError(
                f"quant.kernel 'pallas': the kernel cannot take {q!r} with input {x.shape} "
                "(it needs a 4-bit format, an unstacked [K, N] weight, N a multiple of a "
                "power-of-two tile of the quant block and K of a power-of-two tile >= 16)"
            )
        return tiles
    if tiles is None:
        return None
    key = (*geo, jnp.dtype(x.dtype).name, q.double_quant, tiles)
    if key not in _AUTO:
        kernel_s, xla_s = measure(tiles, *geo, x.dtype, q.double_quant, xla)
        _AUTO[key] = (kernel_s < xla_s, kernel_s, xla_s)
    return tiles if _AUTO[key][0] else None


def apply(x: Array, q, tiles: Tiles) -> Array:
    """``x [..., K] . W [K, *out] -> [..., *out]`` through the kernel (``W`` a 4-bit QTensor).

    The double-quantized scales are decoded first by XLA (`quant.block_absmax`, ``[K *
    N / block_size]`` floats); the codes are only reshaped (``[K * N / 2] -> [K, N / 2]``).
    """
    from jaxlora.quant.codec import block_absmax

    k, n = q.item_shape[0], math.prod(q.item_shape[1:])
    codes = q.codes.reshape(k, n // 2)  # [K, N/2]
    scales = block_absmax(q).reshape(k, n // q.block_size)  # [K, N/bs]
    y = qmatmul(x, codes, scales, tiles)  # [..., N]
    return y.reshape(*x.shape[:-1], *q.item_shape[1:])


def _timed(fn: Callable[[], Array], reps: int) -> float:
    """Median seconds of ``fn()`` (already compiled) over ``reps`` runs."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(tiles: Tiles, m: int, k: int, n: int, dtype, double_quant: bool,
            xla: XlaMatmul, reps: int = 5) -> tuple[float, float]:
    """``(kernel seconds, XLA seconds)`` of one forward + input gradient of ``[m, k] x [k, n]``.

    Random data of the shape (the time of a dense matmul does not depend on the values); each
    path compiled and run once before timing. Safe to call while another function is being
    traced: it runs in a thread of its own, where no trace is active (JAX's trace state is
    per thread), so its programs execute instead of joining the caller's.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_measure, tiles, m, k, n, dtype, double_quant, xla, reps).result()


def _measure(tiles, m, k, n, dtype, double_quant, xla, reps):
    from jaxlora.quant.codec import quantize

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    q = quantize(jax.random.normal(kw, (k, n), jnp.float32), tiles.qtype, tiles.block_size,
                 double_quant)

    def step(f):
        def run(x, q):
            y, back = jax.vjp(lambda x_: f(x_, q), x)
            return y, back(y)[0]  # forward and dx
        return jax.jit(run)

    paths = (step(lambda x_, q_: apply(x_, q_, tiles)), step(xla))
    for p in paths:
        jax.block_until_ready(p(x, q))  # compile
    kernel_s, xla_s = (_timed(lambda p=p: p(x, q), reps) for p in paths)
    return kernel_s, xla_s


def auto_choices() -> list[dict]:
    """The ``"auto"`` decisions of this process: one dict per product shape measured.

    Keys: ``m, k, n, dtype, double_quant, kernel`` (bool: the kernel was faster),
    ``kernel_s``, ``xla_s``; for benchmark reports.
    """
    return [
        dict(m=key[0], k=key[1], n=key[2], dtype=key[3], double_quant=key[4], kernel=chosen,
             kernel_s=ks, xla_s=xs)
        for key, (chosen, ks, xs) in _AUTO.items()
    ]

