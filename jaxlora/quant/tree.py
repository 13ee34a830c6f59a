"""Quantizing whole parameter trees: which leaves (`select`), the codec over them
(`quantize_tree`) and the size report of any partly quantized tree (`report`).

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) quantizes the frozen base weights of the
linear projections and keeps embeddings, the LM head and norms in float; `QuantRules` says
that as regexes over the tree's ``/``-joined paths (`jaxlora.paths`), resolved outside jit.
`select` is the one place the rules are applied: `quantize_tree` uses it on a whole tree and
`jaxlora.io.load_model` on each tensor as it is read, so the two give the same tree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from jaxlora import schema
from jaxlora.kernels import MODES
from jaxlora.paths import flatten_paths, iter_paths, unflatten_paths
from jaxlora.quant.codes import QTYPES

# `QuantRules` is a config section, checked before JAX is imported: this module imports the
# codec (and so JAX) only in the functions that quantize or meet quantized leaves.

__all__ = [
    "QuantRules",
    "check_block_size",
    "select",
    "LeafReport",
    "QuantReport",
    "report",
    "quantize_tree",
]

Params = dict  # nested dict[str, Array | QTensor]


def check_block_size(block_size: Any, where: str) -> None:
    """Refuse (ValueError naming ``where``) a block size that is not a power of two in 32..4096.

    The same rule as ``codec.check_args``, without importing the codec (and JAX)."""
    if (
        not isinstance(block_size, (int, np.integer))
        or isinstance(block_size, bool)
        or not 32 <= block_size <= 4096
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"{where}: block_size {block_size!r} must be a power of two in 32..4096")


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
        check=lambda v: check_block_size(v, "QuantRules"),
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
    kernel: str = schema.field(
        "auto", "How matmuls meet the quantized weights: xla (dequantize, then XLA's dot), "
        "pallas (the fused Pallas dequantize-matmul; interpret mode off GPU), or auto (the "
        "kernel on a single GPU where a one-time measurement per shape finds it faster, else "
        "xla).",
        choices=MODES,
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


def select(rules: QuantRules, path: str, ndim: int) -> int | None:
    """Whether ``rules`` quantize the leaf at ``path`` of rank ``ndim``, and how.

    A leaf is quantized when ``rules.qtype`` is not "none", ``rules.include`` matches its path
    and ``rules.exclude`` does not. One matching ``rules.stacked`` keeps its leading layer axis
    (each layer quantized on its own), others are quantized as one tensor.

    Returns:
      None to keep the leaf as it is, else the ``batch_dims`` to pass to `quantize`: 1 for a
      stacked leaf, 0 otherwise.
    Raises:
      ValueError naming the path when a stacked leaf has no axis left to quantize (rank < 2).
    """
    if rules.qtype == "none" or re.search(rules.include, path) is None:
        return None
    if re.search(rules.exclude, path) is not None:
        return None
    batch_dims = 1 if re.search(rules.stacked, path) else 0
    if ndim < batch_dims + 1:
        raise ValueError(f"quantize {path!r}: stacked leaf needs rank >= 2, got rank {ndim}")
    return batch_dims


def _leaf_report(path: str, leaf: Any) -> LeafReport | None:
    """The row of one leaf: a QTensor by its stored arrays, an array by shape x itemsize."""
    from jaxlora.quant.codec import QTensor

    if isinstance(leaf, QTensor):
        return LeafReport(path, leaf.shape, leaf.qtype, leaf.size, leaf.nbytes)
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        return None  # not an array (e.g. a Python scalar): nothing stored to count
    dtype = np.dtype(leaf.dtype)
    params = int(np.prod(leaf.shape))
    return LeafReport(path, tuple(leaf.shape), dtype.name, params, params * dtype.itemsize)


def report(tree: Params) -> QuantReport:
    """The size report of a (partly) quantized tree: one `LeafReport` per array leaf.

    Works on any tree of arrays and `QTensor` leaves (quantized on load, by `quantize_tree`,
    or not at all), also under jit (it reads shapes and dtypes only).
    """
    rows = (_leaf_report(path, leaf) for path, leaf in iter_paths(tree))
    return QuantReport(tuple(row for row in rows if row is not None))


def quantize_tree(params: Params, rules: QuantRules = QuantRules()) -> tuple[Params, QuantReport]:
    """Quantize the leaves of ``params`` that `select` picks; return (new tree, `report` of it).

    Array leaves chosen by ``rules`` (see `select`) become `QTensor`s; other leaves are
    returned unchanged. All leaves are validated before any result is returned, so an error
    (a ValueError naming the path) never leaves a half-quantized tree. Call outside jit, or
    inside it (then the NaN/Inf check of `quantize` is skipped).
    """
    import jax

    from jaxlora.quant.codec import check_args, quantize

    if rules.qtype != "none":
        check_args(rules.qtype, rules.block_size, "QuantRules")
    out: dict[str, Any] = {}
    for path, leaf in flatten_paths(params).items():
        is_array = isinstance(leaf, (jax.Array, np.ndarray))
        batch_dims = select(rules, path, np.ndim(leaf)) if is_array else None
        if batch_dims is not None:
            leaf = quantize(
                leaf,
                rules.qtype,
                rules.block_size,
                rules.double_quant,
                batch_dims=batch_dims,
                name=path,
                kernel=rules.kernel,
            )
        out[path] = leaf
    tree = unflatten_paths(out)
    return tree, report(tree)
