"""Sources -> files: files, folders, globs and ``stdlib:<glob>``, de-duplicated and sorted.

The accepted spellings are listed in the `jaxlora.data` docstring ("Sources").
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Sequence

from jaxlora.errors import DataError

__all__ = ["resolve_sources"]


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        out.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return out


def resolve_sources(sources: Sequence[str]) -> list[str]:
    """Files named by `sources` (see the `jaxlora.data` docstring), de-duplicated, sorted."""
    files: set[str] = set()
    for src in sources:
        if src.startswith("stdlib:"):
            base = _stdlib_dir()
            pattern = os.path.join(base, src[len("stdlib:") :])
            found = [
                f
                for f in glob.glob(pattern, recursive=True)
                if os.path.isfile(f)
                and not {"site-packages", "dist-packages", "__pycache__"}
                & set(os.path.relpath(f, base).split(os.sep))
            ]
            if not found:
                raise DataError(f"data source {src!r}: no files match under {base}")
        elif glob.has_magic(src):
            found = []
            for p in glob.glob(os.path.expanduser(src), recursive=True):
                found.extend(_walk(p) if os.path.isdir(p) else [p])
            if not found:
                raise DataError(f"data source {src!r}: glob matches no files")
        else:
            path = os.path.expanduser(src)
            if os.path.isdir(path):
                found = _walk(path)
                if not found:
                    raise DataError(f"data source {src!r}: folder holds no files")
            elif os.path.exists(path):
                found = [path]
            else:
                raise DataError(f"data source {src!r}: no such file or folder")
        files.update(os.path.abspath(f) for f in found)
    return sorted(files)

