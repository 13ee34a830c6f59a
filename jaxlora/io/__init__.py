"""Model loading and saving: GGUF files, Hugging Face folders, tokenizers.

`load_model` streams a checkpoint one tensor at a time into the parameter tree of DESIGN.md:
each tensor is read (memory-mapped), converted to JAX layout, checked against the shape the
config implies, and either cast to `dtype` into a preallocated `[L, ...]` host buffer or, when
`quant` selects it, quantized right away per layer. Peak host memory therefore stays near the
final footprint plus one float tensor.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import memory, models
from jaxlora.errors import ModelLoadError
from jaxlora.io.gguf import GGUFSource, permute_qk, unpermute_qk
from jaxlora.io.hf import HFSource, save_hf
from jaxlora.io.registry import KNOWN_MODELS, RANDOM_MODELS, RandomSource, resolve
from jaxlora.io.tokenizer import Tokenizer
from jaxlora.models.config import ModelConfig
from jaxlora.paths import unflatten_paths

__all__ = [
    "LoadedModel",
    "load_model",
    "rules_hook",
    "model_config",
    "open_source",
    "save_hf",
    "resolve",
    "KNOWN_MODELS",
    "RANDOM_MODELS",
    "Tokenizer",
    "GGUFSource",
    "HFSource",
    "permute_qk",
    "unpermute_qk",
]

Params = dict[str, Any]
# A quantization hook: (path, float32 array of ONE layer (or the whole leaf), layer index or
# None) -> the quantized leaf, or None to keep the leaf in float.
QuantHook = Callable[[str, np.ndarray, "int | None"], Any]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What `load_model` returns."""

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer
    source: str  # the resolved file or folder


def open_source(path: str | os.PathLike[str]) -> GGUFSource | HFSource:
    """Open a resolved path: a `.gguf` file or a Hugging Face folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return HFSource(path)
    return GGUFSource(path)


def rules_hook(rules: Any, dtype: Any) -> QuantHook | None:
    """A hook that applies `jaxlora.quant.QuantRules` to one tensor (one layer) at a time.

    Which tensors, and over how many stacked axes, is `jaxlora.quant.select`, the decision
    `quantize_tree` makes: a layer's slice of a stacked leaf is quantized on its own, and
    stacking the slices equals `quantize(..., batch_dims=1)` of the stacked leaf. So loading
    with `quant=rules` gives the tree of `quantize_tree(load_model(...).params, rules)` without
    ever holding the float model.
    """
    from jaxlora import quant as q

    if rules.qtype == "none":
        return None
    # One jitted function, compiled once per tensor shape: eager quantization of ~200 tensors
    # costs ~45 s of op dispatch for SmolLM2, jitted ~1 s of compiles.
    fn = jax.jit(
        lambda x, batch_dims: q.quantize(
            x, rules.qtype, rules.block_size, rules.double_quant, batch_dims=batch_dims,
            kernel=rules.kernel,
        ),
        static_argnums=1,
    )

    def hook(path: str, arr: np.ndarray, layer: int | None) -> Any:
        sliced = layer is not None  # one layer of a stacked leaf: its leading axis is gone
        batch_dims = q.select(rules, path, arr.ndim + sliced)
        if batch_dims is None:
            return None
        where = path if layer is None else f"{path}[layer {layer}]"
        if sliced and batch_dims == 0:
            raise ModelLoadError(
                f"cannot quantize {where} on load: rules.stacked {rules.stacked!r} does not "
                "match it, so it would be quantized whole; load it in float and quantize_tree it"
            )
        if not np.isfinite(arr).all():  # the check quantize() does eagerly, which jit skips
            raise ModelLoadError(f"cannot quantize {where}: it contains NaN or Inf")
        return fn(jnp.asarray(arr, dtype=dtype), batch_dims - int(sliced))

    return hook


def _as_hook(quant: Any, dtype: Any) -> QuantHook | None:
    """Turn `quant` into a per-tensor hook: None, a `jaxlora.quant.QuantRules`, a qtype string
    ("nf4", "int8", ... with the default rules), or a hook callable."""
    if quant is None:
        return None
    from jaxlora import quant as q

    if isinstance(quant, str):
        quant = q.QuantRules(qtype=quant)
    if isinstance(quant, q.QuantRules):
        return rules_hook(quant, dtype)
    if callable(quant):
        return quant
    raise TypeError(f"quant must be None, a QuantRules, a qtype string or a callable, got {type(quant).__name__}")


def _to_device(x: np.ndarray) -> jax.Array:
    """Copy a host buffer to a jax.Array and wait, so the buffer can be freed right away.

    (Without the wait the transfer is asynchronous: every source buffer stays alive until the
    first `block_until_ready`, and the peak is two copies of the model.) A buffer of its own
    goes by `device_put`, one copy (`jnp.asarray` makes two on CPU, jax 0.10.2: 500 MB more for a
    7B model's embedding); a view into a memory-mapped file by `jnp.asarray`, which copies it
    out of the map (a `device_put` of it keeps the file's pages resident).
    """
    if x.flags.owndata:
        return jax.block_until_ready(jax.device_put(x))
    return jax.block_until_ready(jnp.asarray(x))


def _stack_leaves(leaves: list[Any]) -> Any:
    """Stack per-layer leaves (arrays or QTensors, which stack by their children)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *leaves)


def assemble(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, str, int | None, np.ndarray]],
    *,
    source: str,
    dtype: Any = jnp.float32,
    quant: QuantHook | None = None,
) -> Params:
    """Build the nested parameter dict from a stream of `(name, path, layer, array)`.

    Checks every shape against `models.param_shapes(cfg)` (derived from the family's
    initializer) and that no tensor is missing or repeated.
    """
    shapes = models.param_shapes(cfg)
    np_dtype = np.dtype(dtype)
    L = cfg.num_layers
    floats: dict[str, np.ndarray] = {}  # stacked float leaves, preallocated [L, ...]
    quantized: dict[str, list[Any]] = {}  # per-layer quantized leaves
    done: dict[str, Any] = {}  # finished unstacked leaves
    seen: dict[str, set[int]] = {}
    for name, path, layer, arr in tensors:
        want = shapes.get(path)
        if want is None:
            raise ModelLoadError(f"{source}: tensor {name!r} ({path}) is not used by this config ({cfg.arch})")
        got = tuple(arr.shape) if layer is None else (L, *arr.shape)
        if got != want:
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {list(arr.shape)}, config implies "
                f"{list(want if layer is None else want[1:])} for {path}"
            )
        hit = seen.setdefault(path, set())
        key = -1 if layer is None else layer
        if key in hit:
            raise ModelLoadError(f"{source}: tensor {name!r} appears twice")
        hit.add(key)
        leaf = quant(path, np.asarray(arr, dtype=np.float32), layer) if quant is not None else None
        if layer is None:
            done[path] = leaf if leaf is not None else _to_device(np.asarray(arr, dtype=np_dtype))
        elif leaf is not None:
            lst = quantized.setdefault(path, [None] * L)
            lst[layer] = leaf
        else:
            buf = floats.get(path)
            if buf is None:
                buf = floats[path] = np.empty(want, dtype=np_dtype)
            buf[layer] = arr
        del arr, leaf
    missing = []
    for path, want in shapes.items():
        layers = seen.get(path, set())
        if want and path.startswith("layers/"):
            lack = sorted(set(range(L)) - layers)
            if lack:
                missing.append(f"{path} (layers {lack[:5]}{'...' if len(lack) > 5 else ''})")
        elif -1 not in layers:
            missing.append(path)
    if missing:
        raise ModelLoadError(f"{source}: missing tensors: {', '.join(missing)}")
    for path in list(floats):
        if path in quantized:
            raise ModelLoadError(f"{source}: {path}: quantization hook quantized only some layers")
        done[path] = _to_device(floats.pop(path))  # one leaf at a time: peak = final + 1 leaf
    for path in list(quantized):
        done[path] = jax.block_until_ready(_stack_leaves(quantized.pop(path)))
    return unflatten_paths({path: done[path] for path in shapes})  # in the initializer's order


def model_config(name_or_path: str | os.PathLike[str]) -> ModelConfig:
    """The architecture of a model, read from its file's header alone (no weights loaded)."""
    random = RANDOM_MODELS.get(os.fspath(name_or_path))
    if random is not None:
        return random.open(os.fspath(name_or_path)).config
    return open_source(resolve(name_or_path)).config


def load_model(
    name_or_path: str | os.PathLike[str], *, quant: Any = None, dtype: Any = jnp.float32,
    seed: int = 0,
) -> LoadedModel:
    """Load a model by name (`smollm2-135m-instruct`, `gemma3-270m`, `tiny-llama`), `.gguf`
    path or HF folder.

    Args:
      name_or_path: a key of `KNOWN_MODELS` or `RANDOM_MODELS`, a `.gguf` file or a folder
        with `config.json`.
      quant: None for float weights; a `jaxlora.quant.QuantRules` (or a qtype string like
        "nf4" for the default rules); or a hook `(path, float32 array, layer or None) -> leaf
        or None`. It is applied to each tensor as it is read (per layer for `layers/` leaves),
        so the float model never exists in memory.
      dtype: the float dtype of leaves that are not quantized.
      seed: the weights' seed of a random model (`RANDOM_MODELS`); unused otherwise.

    Returns:
      `LoadedModel(config, params, tokenizer, source)` (`source`: the resolved file or folder,
      or the random model's name).
    Raises:
      ModelLoadError: a missing, corrupt or unsupported file, or tensors that do not fit.
    """
    src: GGUFSource | HFSource | RandomSource
    random = RANDOM_MODELS.get(os.fspath(name_or_path))
    if random is not None:
        src = random.open(os.fspath(name_or_path), seed=seed, dtype=dtype)
    else:
        src = open_source(resolve(name_or_path))
    # The tokenizer first: building it has a transient of ~100-250 MB (Rust BPE construction),
    # which would otherwise add to the peak on top of the loaded weights.
    tokenizer = src.tokenizer()
    source = str(src.path)
    params = assemble(src.config, src.tensors(), source=source, dtype=dtype, quant=_as_hook(quant, dtype))
    memory.return_freed_memory()  # the per-tensor conversion buffers
    return LoadedModel(config=src.config, params=params, tokenizer=tokenizer, source=source)
