"""Parameter trees as nested dicts and their `/`-joined leaf paths.

Every selection in jaxlora (quantization rules, LoRA targets) is a regex over these paths,
resolved once outside `jit`. Anything that is not a Mapping (arrays, QTensor, LoRA leaves) is
a leaf.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["iter_paths", "flatten_paths", "unflatten_paths", "replace_paths"]


def iter_paths(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` pairs in insertion order; ``None`` leaves are skipped."""
    for k in tree:
        v = tree[k]
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from iter_paths(v, p)
        elif v is not None:
            yield p, v


def flatten_paths(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": x}} -> {"a/b": x}``."""
    return dict(iter_paths(tree))


def unflatten_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_paths`."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, last = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def replace_paths(
    tree: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """A copy of ``tree`` whose leaves at the paths of ``new`` are ``new[path]``.

    The dict structure (and key order) of ``tree`` is kept; paths of ``new`` that are not leaves
    of ``tree`` are ignored, and ``tree`` itself is not modified. This is how a view of a
    parameter tree is built (LoRA weights at the targeted leaves, a residual base after PiSSA,
    merged weights) without rebuilding the untouched part of the tree.

    Example: ``replace_paths({"a": {"b": 1, "c": 2}}, {"a/b": 9}) == {"a": {"b": 9, "c": 2}}``.
    """
    out = {}
    for k in tree:
        v = tree[k]
        p = f"{prefix}/{k}" if prefix else str(k)
        out[k] = replace_paths(v, new, p) if isinstance(v, Mapping) else new.get(p, v)
    return out
