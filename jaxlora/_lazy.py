"""PEP 562 lazy packages: a package's public names imported from their modules on first use.

`import jaxlora.lora` then costs nothing until a name is used, so that the jax-free parts of a
package (its spec classes, which configs are made of) can be imported without JAX.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["attach"]


def attach(
    package: str, names: Mapping[str, Sequence[str]], submodules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` of `package`.

    Args:
      package: the package's ``__name__``.
      names: module (absolute name) -> the public names it defines for the package.
      submodules: the package's submodules, reachable as attributes before being imported.
    """
    where = {n: mod for mod, ns in names.items() for n in ns}
    public = [n for ns in names.values() for n in ns]

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*public, *submodules})

    return __getattr__, __dir__, public
