"""A pytree as a flat ``{"leaf_00000": array, ...}`` dict plus a manifest, and back.

Why flat: the TrainState holds NamedTuples, optax states and LoRA pairs whose node types
Orbax would otherwise have to reconstruct. A flat dict of arrays plus a manifest (path, shape,
dtype, crc32 per leaf) restores into any template with the same leaves, says *which* leaf
differs when it does not fit, and lets a reader tell a damaged step (a leaf that fails its
checksum) from a good one, which Orbax's own listing cannot.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.errors import CheckpointError

__all__ = [
    "leaf_table",
    "leaf_key",
    "crc32",
    "flatten",
    "check_template",
    "unflatten_like",
]


def _path_str(path: tuple) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def leaf_table(tree: Any) -> list[tuple[str, tuple[int, ...], str, Any]]:
    """[(path, shape, dtype, leaf)] in flatten order; paths like ``adapters/layers/.../a``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in flat:
        arr = leaf if hasattr(leaf, "shape") else np.asarray(leaf)
        out.append((_path_str(path), tuple(int(s) for s in arr.shape), str(arr.dtype), leaf))
    return out


def leaf_key(i: int) -> str:
    """The flat dict key of the ``i``-th leaf."""
    return f"leaf_{i:05d}"


def crc32(x: np.ndarray) -> int:
    """crc32 of an array's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(x).tobytes()) & 0xFFFFFFFF


def _host(path: str, leaf: Any) -> np.ndarray:
    """A leaf in host memory. A multi-host run's state is replicated on every device; each
    process saves its own copy (Orbax writes it once), never a gather across hosts."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise CheckpointError(f"{path}: split across processes ({leaf.sharding}); the "
                                  f"checkpointed state must be replicated")
        leaf = leaf.addressable_data(0)
    return np.asarray(leaf)


def flatten(tree: Any) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """(host arrays by `leaf_key`, manifest entries ``{path, shape, dtype, crc32}``)."""
    table = leaf_table(tree)
    host = {leaf_key(i): _host(p, leaf) for i, (p, _, _, leaf) in enumerate(table)}
    manifest = [
        {"path": p, "shape": list(s), "dtype": d, "crc32": crc32(host[leaf_key(i)])}
        for i, (p, s, d, _) in enumerate(table)
    ]
    return host, manifest


def check_template(where: Path, manifest: list, table: list) -> None:
    """Raise CheckpointError naming the leaves where ``manifest`` and a `leaf_table` differ."""
    saved = {m["path"]: (tuple(m["shape"]), m["dtype"]) for m in manifest}
    cur = {p: (s, d) for p, s, d, _ in table}
    missing = [p for p in saved if p not in cur]
    extra = [p for p in cur if p not in saved]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"saved leaves not in the template: {', '.join(missing[:5])}")
        if extra:
            parts.append(f"template leaves not in the checkpoint: {', '.join(extra[:5])}")
        raise CheckpointError(f"{where}: state does not match the template: " + "; ".join(parts))
    for m, (p, s, d, _) in zip(manifest, table, strict=True):
        if m["path"] != p:
            raise CheckpointError(f"{where}: leaf order differs at {p} (saved {m['path']})")
        if tuple(m["shape"]) != s or m["dtype"] != d:
            raise CheckpointError(
                f"{where}: leaf {p} is {m['dtype']}{list(m['shape'])} in the checkpoint, "
                f"{d}{list(s)} in the template (adapter rank or targets differ?)"
            )


def unflatten_like(template: Any, leaves: list[np.ndarray]) -> Any:
    """``template``'s structure with ``leaves``; numpy where the template leaf is numpy."""
    treedef = jax.tree_util.tree_structure(template)
    tmpl_leaves = jax.tree_util.tree_leaves(template)
    out = [
        x if isinstance(t, np.ndarray) else jax.numpy.asarray(x)
        for x, t in zip(leaves, tmpl_leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)
