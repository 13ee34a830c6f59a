"""Hugging Face model folders: `config.json` + `*.safetensors` (+ `tokenizer.json`), both ways.

Reading streams one tensor at a time from the safetensors files, each shard of a sharded folder
(`model.safetensors.index.json`) in turn (a small reader of the format, so BF16 works without
torch and a truncated file gives a clear error). Torch `Linear`
weights `[out, in]` are transposed to kernels `[in, out]`; GPT-2's `Conv1D` weights are already
`[in, out]` and are kept. `save_hf` writes the inverse, so transformers can load the folder.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxlora import models
from jaxlora.errors import ModelLoadError
from jaxlora.models import Family, ModelConfig
from jaxlora.paths import flatten_paths

__all__ = ["HFSource", "save_hf", "config_from_hf", "config_to_hf", "read_safetensors", "iter_safetensors",
           "write_safetensors"]

_LLAMA_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
try:
    import ml_dtypes

    _ST_DTYPES["BF16"] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes comes with jax
    pass
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# --- safetensors ----------------------------------------------------------------------------
class _Entry(NamedTuple):
    """One tensor of a safetensors file: where its bytes are in the file, and what they are."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int


def _entries(path: Path) -> list[_Entry]:
    """The checked header of a safetensors file: every tensor's dtype, shape and byte range."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    header.pop("__metadata__", None)
    base = 8 + n
    out = []
    for name, info in header.items():
        try:
            dt = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: tensor {name!r}: bad or unsupported header entry {info!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dt.itemsize or base + end > size:
            raise ModelLoadError(
                f"{path}: tensor {name!r}: data offsets {start}..{end} do not fit its shape "
                f"{list(shape)} {info['dtype']} or the file size {size} (truncated?)"
            )
        out.append(_Entry(name, dt, shape, base + start, end - start))
    return out


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Memory-mapped, read-only views of every tensor in a safetensors file (name -> array)."""
    path = Path(path)
    entries = _entries(path)
    if not any(e.nbytes for e in entries):
        return {e.name: np.zeros(e.shape, e.dtype) for e in entries}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {e.name: data[e.offset : e.offset + e.nbytes].view(e.dtype).reshape(e.shape)
            for e in entries}


def iter_safetensors(path: str | os.PathLike[str]
                     ) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Each tensor of a safetensors file in turn, as `(name, read)`: `read()` reads it from
    the file into a buffer of its own.

    What loading streams through: only the caller holds a tensor, and drops it before reading
    the next, so host memory holds one tensor at a time. (Views of a memory map would keep
    every page they touched resident until the whole map is dropped, and the RSS counts those
    pages: a multi-GB shard would count whole.)
    """
    path = Path(path)
    with open(path, "rb") as f:
        for e in _entries(path):
            def read(e: _Entry = e) -> np.ndarray:
                f.seek(e.offset)
                buf = np.empty(e.shape, e.dtype)
                if f.readinto(buf.reshape(-1).view(np.uint8)) != e.nbytes:
                    raise ModelLoadError(f"{path}: tensor {e.name!r}: file ended early (truncated?)")
                return buf

            yield e.name, read


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: dict[str, Any],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file one tensor at a time.

    `tensors` maps names to arrays, or to `(shape, dtype, make)` triples where `make()` returns
    the array only when it is written, so the caller never holds a second copy of the model.
    """
    specs: dict[str, tuple[tuple[int, ...], np.dtype, Any]] = {}
    for name, v in tensors.items():
        if isinstance(v, tuple):
            shape, dt, make = v
            specs[name] = (tuple(shape), np.dtype(dt), make)
        else:
            arr = np.asarray(v)
            specs[name] = (arr.shape, arr.dtype, lambda arr=arr: arr)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (shape, dt, _) in specs.items():
        dt = dt.newbyteorder("<") if dt.byteorder == ">" else dt
        if dt not in _ST_NAMES:
            raise ValueError(f"{name}: dtype {dt} cannot be written to safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dt, make) in specs.items():
            arr = np.ascontiguousarray(make(), dtype=dt.newbyteorder("<"))
            if arr.shape != shape:
                raise ValueError(f"{name}: produced shape {arr.shape}, declared {shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)  # no extra copy of the bytes


# --- config ---------------------------------------------------------------------------------
def _first(v: Any) -> int | None:
    if isinstance(v, list):
        v = v[0] if v else None
    return None if v is None else int(v)


def _llama_rope(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` (default or Llama 3) of a Llama-family config."""
    rope = dict(cfg.get("rope_parameters") or {})
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype == "default":
            scaling = None
        elif rtype != "llama3":
            raise ModelLoadError(f"{source}: rope_scaling type {rtype!r} is not supported (only 'llama3')")
        else:
            keep = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = tuple(sorted((k, scaling[k]) for k in keep if k in scaling))
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _gemma3_fields(cfg: dict[str, Any], n_layers: int, source: str) -> dict[str, Any]:
    """Gemma 3's extra config fields: layer kinds, window, local RoPE base, score scale.

    Both transformers spellings: `layer_types` or the older `sliding_window_pattern`, and
    `rope_parameters` per layer kind or `rope_theta` / `rope_local_base_freq` / `rope_scaling`.
    """
    kinds = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", 6)) == 0
        else "sliding_attention" for i in range(n_layers)]
    if len(kinds) != n_layers or set(kinds) - {"full_attention", "sliding_attention"}:
        raise ModelLoadError(f"{source}: layer_types must list full_attention/sliding_attention "
                             f"for each of the {n_layers} layers")
    rope = dict(cfg.get("rope_parameters") or {})
    glob = dict(rope.get("full_attention") or {})
    local = dict(rope.get("sliding_attention") or {})
    scaling = cfg.get("rope_scaling") or (glob if glob.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("default", "linear"):
        raise ModelLoadError(f"{source}: Gemma 3 rope_scaling type "
                             f"{scaling.get('rope_type')!r} is not supported (only 'linear')")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ModelLoadError(f"{source}: {key} = {cfg[key]} is not supported")
    return dict(
        arch="gemma3", qk_norm=True, sliding_window=int(cfg.get("sliding_window") or 4096),
        sliding_layers=tuple(i for i, k in enumerate(kinds) if k == "sliding_attention"),
        rope_theta=float(cfg.get("rope_theta", glob.get("rope_theta", 1e6))),
        rope_local_theta=float(cfg.get("rope_local_base_freq", local.get("rope_theta", 1e4))),
        rope_scaling=(None if not scaling or scaling.get("rope_type", scaling.get("type")) == "default"
                      else (("factor", float(scaling["factor"])), ("rope_type", "linear"))),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def config_from_hf(cfg: dict[str, Any], *, source: str = "config.json") -> tuple[ModelConfig, str]:
    """`(ModelConfig, hf_model_type)` from a transformers `config.json` dict."""
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type")
    if "GPT2LMHeadModel" in archs or (not archs and mtype == "gpt2"):
        d, heads = int(cfg["n_embd"]), int(cfg["n_head"])
        return ModelConfig(
            arch="gpt2", vocab_size=int(cfg["vocab_size"]), hidden_size=d, num_layers=int(cfg["n_layer"]),
            num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
            intermediate_size=int(cfg.get("n_inner") or 4 * d),
            max_position_embeddings=int(cfg.get("n_positions", 1024)),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), tie_embeddings=True,
            bos_token_id=_first(cfg.get("bos_token_id")), eos_token_id=_first(cfg.get("eos_token_id")),
            name=str(cfg.get("_name_or_path") or "gpt2"),
        ), "gpt2"
    kind = next((_LLAMA_TYPES[a] for a in archs if a in _LLAMA_TYPES), None)
    if kind is None and not archs and mtype in _LLAMA_TYPES.values():
        kind = mtype
    if kind is None:
        raise ModelLoadError(
            f"{source}: architecture {archs or mtype!r} is not supported "
            f"(supported: {', '.join([*_LLAMA_TYPES, 'GPT2LMHeadModel'])})"
        )
    try:
        d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        if kind == "gemma3_text":
            extra = _gemma3_fields(cfg, int(cfg["num_hidden_layers"]), source)
        else:
            extra = {"arch": "llama", "qk_norm": kind == "qwen3", **_llama_rope(cfg, source),
                     "tie_embeddings": bool(cfg.get("tie_word_embeddings", False))}
        return ModelConfig(
            **extra, vocab_size=int(cfg["vocab_size"]), hidden_size=d,
            num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or d // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            attention_bias=True if kind == "qwen2" else bool(cfg.get("attention_bias", False)),
            bos_token_id=_first(cfg.get("bos_token_id")), eos_token_id=_first(cfg.get("eos_token_id")),
            name=str(cfg.get("_name_or_path") or kind),
        ), kind
    except KeyError as e:
        raise ModelLoadError(f"{source}: missing key {e.args[0]!r}") from None


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """A transformers `config.json` dict for `config`."""
    c = config
    if c.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads,
            "n_inner": c.intermediate_size, "n_positions": c.max_position_embeddings,
            "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": True, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
            "torch_dtype": dtype, "_name_or_path": c.name,
        }
    if c.arch == "gemma3":
        return _gemma3_to_hf(c, dtype)
    kind = "qwen3" if c.qk_norm else "qwen2" if c.attention_bias else "llama"
    arch_name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    out = {
        "architectures": [arch_name[kind]],
        "model_type": kind, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling_dict, "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu",
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": dtype,
        "_name_or_path": c.name,
    }
    if kind != "qwen2":
        out["attention_bias"] = c.attention_bias
    if kind == "llama":
        out["mlp_bias"] = False
    return out


def _gemma3_to_hf(c: ModelConfig, dtype: str) -> dict[str, Any]:
    kinds = ["sliding_attention" if i in c.sliding_layers else "full_attention"
             for i in range(c.num_layers)]
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta, "rope_local_base_freq": c.rope_local_theta or c.rope_theta,
        "rope_scaling": c.rope_scaling_dict, "rms_norm_eps": c.norm_eps,
        "sliding_window": c.sliding_window, "layer_types": kinds,
        "query_pre_attn_scalar": c.query_pre_attn_scalar or c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": dtype,
        "_name_or_path": c.name,
    }


# --- tensor names ---------------------------------------------------------------------------
# Each family's `TensorNames` table (jaxlora.models.llama / gpt2) names every path; here it is
# compiled into readers' patterns. Kernels are transposed unless the family stores [in, out].
class _Row(NamedTuple):
    pattern: re.Pattern[str]  # the HF name (without the family prefix), `{i}` -> (\d+)
    path: str
    transpose: bool


def _rows(fam: Family) -> list[_Row]:
    return [_Row(re.compile("^" + re.escape(t.hf).replace(r"\{i\}", r"(\d+)") + "$"), t.path,
                 _transposed(fam, t.path)) for t in fam.tensors]


def _transposed(fam: Family, path: str) -> bool:
    """Torch `Linear` weights are `[out, in]`; GPT-2's `Conv1D` weights already `[in, out]`."""
    return path.endswith("/kernel") and not fam.hf_kernels_in_out


class HFSource:
    """An opened Hugging Face folder: `config`, `tokenizer()`, `tensors()`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{self.path}: no config.json")
        try:
            self.hf_config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{cfg_path}: not valid JSON: {e}") from None
        self.config, self.model_type = config_from_hf(self.hf_config, source=str(cfg_path))
        self.files = self._shards()

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelLoadError(f"{index}: bad index: {e}") from None
            files = [self.path / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise ModelLoadError(f"{index}: shard {f.name} is missing")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path}: no *.safetensors weights (pytorch .bin is not supported)")
        return files

    def tokenizer(self):  # -> Tokenizer
        from jaxlora.io.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.path, self.hf_config)

    def tensors(self) -> Iterator[tuple[str, str, int | None, np.ndarray]]:
        """Yield `(hf_name, design_path, layer_or_None, float32 array in JAX layout)`."""
        fam = models.family(self.config)
        table, ignored, prefix = _rows(fam), re.compile(fam.hf_ignored), fam.hf_prefix
        tied_copy = fam.head_copy[0] if self.config.tie_embeddings else None
        for file in self.files:
            for name, read in iter_safetensors(file):
                key = name[len(prefix):] if prefix and name.startswith(prefix) else name
                if ignored.search(key) or key == tied_copy:
                    continue  # a buffer, or a stored copy of the tied embedding
                hit = next(((row.pattern.match(key), row.path, row.transpose) for row in table
                            if row.pattern.match(key)), None)
                if hit is None:
                    raise ModelLoadError(f"{file}: unexpected tensor {name!r} for {self.model_type}")
                m, path, transpose = hit
                raw = read()
                if not np.issubdtype(raw.dtype, np.floating) and raw.dtype.name != "bfloat16":
                    raise ModelLoadError(f"{file}: tensor {name!r} has non-float dtype {raw.dtype}")
                if transpose and raw.ndim != 2:
                    raise ModelLoadError(f"{file}: tensor {name!r} should be 2-D, has shape {list(raw.shape)}")
                try:  # converted and transposed in one pass, into one contiguous float32 copy
                    w = np.ascontiguousarray(raw.T if transpose else raw, dtype=np.float32)
                except Exception as e:
                    raise ModelLoadError(f"{file}: cannot read tensor {name!r}: {e}") from None
                del raw
                layer = int(m.group(1)) if m.groups() else None
                if layer is not None and layer >= self.config.num_layers:
                    raise ModelLoadError(f"{file}: tensor {name!r}: layer {layer} >= num_hidden_layers {self.config.num_layers}")
                yield name, path, layer, w
                del w  # one tensor at a time: not alive while the next one is read


# --- writing --------------------------------------------------------------------------------
def _to_numpy(leaf: Any) -> np.ndarray:
    """A host view/copy of `leaf` (Array, QTensor or numpy); QTensors are dequantized."""
    if hasattr(leaf, "item_shape") and hasattr(leaf, "qtype"):  # a jaxlora.quant.QTensor
        from jaxlora import quant

        return np.asarray(quant.dequantize(leaf, None))
    return np.asarray(leaf)  # zero-copy for CPU jax arrays


def save_hf(
    folder: str | os.PathLike[str],
    config: ModelConfig,
    params: dict[str, Any],
    tokenizer: Any = None,
    dtype: str = "float32",
) -> Path:
    """Write `params` as a Hugging Face folder: `config.json`, `model.safetensors`
    (+ `tokenizer.json`, `tokenizer_config.json`). QTensor leaves are dequantized.

    Args:
      dtype: "float32" or "bfloat16" for the stored weights.
    Returns:
      the folder.
    """
    import ml_dtypes

    np_dtype = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = flatten_paths(params)
    fam = models.family(config)
    table = [(t.hf, t.path, _transposed(fam, t.path)) for t in fam.tensors]
    prefix = fam.hf_prefix
    extra = sorted(set(flat) - {path for _, path, _ in table})
    if extra:
        raise ValueError(f"save_hf: parameters with no Hugging Face name: {extra}")
    # Lazy tensors: each layer slice is converted (dequantized, transposed, cast) only when
    # written, so export needs about one leaf of extra host memory, not a copy of the model.
    cache: dict[str, np.ndarray] = {}

    def leaf(path: str) -> np.ndarray:
        if path not in cache:
            cache.clear()  # the table visits one leaf's layers consecutively
            cache[path] = _to_numpy(flat[path])
        return cache[path]

    def make(path: str, i: int | None, transpose: bool) -> Any:
        def f() -> np.ndarray:
            w = leaf(path) if i is None else leaf(path)[i]
            return (w.T if transpose else w).astype(np_dtype, copy=False)

        return f

    out: dict[str, Any] = {}
    for hf, path, transpose in table:
        if path not in flat:
            continue
        shape = tuple(flat[path].shape)
        if "{i}" in hf:
            item = shape[1:][::-1] if transpose else shape[1:]
            for i in range(shape[0]):
                out[prefix + hf.format(i=i)] = (item, np_dtype, make(path, i, transpose))
        else:
            out[prefix + hf] = (shape[::-1] if transpose else shape, np_dtype, make(path, None, transpose))
    write_safetensors(folder / "model.safetensors", out, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
