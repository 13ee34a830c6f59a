"""GGUF reading (llama.cpp's format): metadata -> `ModelConfig`, tensors -> float numpy arrays.

The file is memory-mapped with `gguf.GGUFReader`; `tensors()` dequantizes one tensor at a time
(`gguf.quants.dequantize`: F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K and the rest the package
knows), undoes llama.cpp's Q/K row permutation, and yields it under its DESIGN.md path in JAX
layout (kernels `[in, out]`).

The permutation: llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) rewrites the rows of
`q_proj` / `k_proj` from Hugging Face's "rotate-half" RoPE layout to GGML's interleaved one:

    w.reshape(n_head, 2, out // n_head // 2, in).swapaxes(1, 2).reshape(out, in)

with `n_head = n_kv_heads` for `k_proj`. It applies to the `llama` architecture only (Mistral
files say `llama` too; Qwen2, Qwen3, Gemma 3 and GPT-2 are stored unpermuted). `unpermute_qk`
inverts it.

Gemma 3: llama.cpp stores each norm weight w as w + 1 (the family's `gguf_norm_shift`,
subtracted on reading). The file gives the window (`gemma3.attention.sliding_window`) and, when
it has them, the interleave (`...sliding_window_pattern`) and the local RoPE base
(`...rope.freq_base_swa`); otherwise the values llama.cpp and transformers fix for Gemma 3 (every
6th layer global, local base 10000). Scores are scaled by head_dim ** -0.5 (the 27B model,
62 layers, by (d / heads) ** -0.5, as llama.cpp does).
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora import models
from jaxlora.errors import ModelLoadError
from jaxlora.models.config import ModelConfig

__all__ = ["GGUFSource", "GGUFFile", "TensorInfo", "permute_qk", "unpermute_qk", "SUPPORTED_TENSOR_TYPES",
           "SUPPORTED_ARCHS"]

# Tensor types we accept; the gguf package can dequantize more, but these are the tested ones.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of a torch-layout `[out, in]` (or `[out]`) q/k weight."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: GGML interleaved rows back to Hugging Face rotate-half rows."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- a small, fast GGUF reader ---------------------------------------------------------------
# gguf.GGUFReader builds a numpy memmap view for every metadata string, which takes ~10 s for
# SmolLM2's 98k tokenizer strings. This reader parses the header with `struct` from one mmap
# (~0.1 s) and gives each tensor's bytes as a memory-mapped uint8 view [rows, row_bytes], the
# input `gguf.quants.dequantize` takes. It follows the GGUF v2/v3 spec (little-endian only).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: `shape` is GGUF's `ne` order (innermost first)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: int
    data: np.ndarray  # uint8 [rows, row_bytes], memory-mapped


class GGUFFile:
    """Parsed GGUF header (`fields`: key -> Python value) and tensors (`tensors`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._mm)
        self._buf, self._pos = buf, 0
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"bad magic {bytes(buf[:4])!r} (expected b'GGUF')")
        self._pos = 4
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            shape = tuple(self._scalar("<Q") for _ in range(n_dims))
            ttype, offset = self._scalar("<I"), self._scalar("<Q")
            infos.append((name, shape, ttype, offset))
        align = int(self.fields.get("general.alignment", 32))
        start = self._pos + (-self._pos % align)
        self.tensors: list[TensorInfo] = []
        for name, shape, ttype, offset in infos:
            try:
                qt = GGMLQuantizationType(ttype)
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown type id {ttype}") from None
            block, size = GGML_QUANT_SIZES[qt]
            if not shape or shape[0] % block:
                raise ValueError(f"tensor {name!r}: shape {list(shape)} does not fit {qt.name} blocks of {block}")
            rows = int(np.prod(shape[1:], dtype=np.int64))
            row_bytes = shape[0] // block * size
            a, b = start + offset, start + offset + rows * row_bytes
            if b > len(self._mm):
                raise ValueError(
                    f"tensor {name!r} ({qt.name} {list(shape)}) needs bytes {a}..{b}, "
                    f"file has {len(self._mm)} (truncated?)"
                )
            self.tensors.append(TensorInfo(name, shape, ttype, self._mm[a:b].reshape(rows, row_bytes)))

    def _scalar(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._scalar("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError("string runs past the end of the file")
        s = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, n = self._scalar("<I"), self._scalar("<Q")
            if itype in _SCALARS and itype != 7:  # fast path: one numpy read
                dt = np.dtype(_SCALARS[itype])
                end = self._pos + n * dt.itemsize
                if end > len(self._buf):
                    raise ValueError("array runs past the end of the file")
                arr = np.frombuffer(self._buf[self._pos : end], dtype=dt).tolist()
                self._pos = end
                return arr
            return [self._value(itype) for _ in range(n)]
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self._scalar(fmt)


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_LLAMA_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ARCHS = (*_LLAMA_ARCHS, "gemma3", "gpt2")
_GEMMA3_PATTERN, _GEMMA3_LOCAL_BASE = 6, 10000.0


def _dequantize_rows(data: np.ndarray, qtype: Any, dequantize: Any, chunk_bytes: int = 8 << 20) -> np.ndarray:
    """Dequantize `[rows, row_bytes]` into float32 `[rows, cols]`, a few MB of rows at a time.

    gguf's numpy dequantizers make several full-size float temporaries; chunking bounds them,
    so the peak stays near the output tensor (113 MB for SmolLM2's embedding, not ~4x that).
    """
    rows = data.shape[0]
    step = max(1, chunk_bytes // max(1, data.shape[1]))
    if rows <= step:
        return np.asarray(dequantize(data, qtype), dtype=np.float32)
    first = np.asarray(dequantize(data[:step], qtype), dtype=np.float32)
    out = np.empty((rows, first.shape[1]), dtype=np.float32)
    out[:step] = first
    for i in range(step, rows, step):
        out[i : i + step] = dequantize(data[i : i + step], qtype)
    return out


class GGUFSource:
    """An opened GGUF file: `config`, `metadata`, `tokenizer()`, `tensors()`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such file")
        try:
            self.reader = GGUFFile(self.path)
        except Exception as e:  # ValueError, struct.error, OSError, ...
            raise ModelLoadError(
                f"{self.path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
            ) from None
        self.arch = str(self._get("general.architecture", required=True))
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{self.path}: architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        self.config = self._config()

    # --- metadata -----------------------------------------------------------------------
    def _get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        field = self.reader.fields.get(key)
        if key not in self.reader.fields:
            if required:
                raise ModelLoadError(f"{self.path}: missing metadata key {key!r}")
            return default
        return field

    @property
    def metadata(self) -> dict[str, Any]:
        """All metadata except the large tokenizer arrays (for display)."""
        big = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
        return {k: self._get(k) for k in self.reader.fields if k not in big and not k.startswith("GGUF.")}

    def _names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}

    def _config(self) -> ModelConfig:
        a = self.arch
        g = lambda k, d=None, req=False: self._get(f"{a}.{k}", d, required=req)
        n_layers = int(g("block_count", req=True))
        d = int(g("embedding_length", req=True))
        n_heads = int(g("attention.head_count", req=True))
        names = self._names()
        vocab = g("vocab_size")
        if vocab is None:
            toks = self.reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(toks) if toks is not None else None
        if vocab is None:
            emb = next(t for t in self.reader.tensors if t.name == "token_embd.weight")
            vocab = int(emb.shape[-1])
        bos = self._get("tokenizer.ggml.bos_token_id")
        eos = self._get("tokenizer.ggml.eos_token_id")
        common = dict(
            vocab_size=int(vocab), hidden_size=d, num_layers=n_layers, num_heads=n_heads,
            max_position_embeddings=int(g("context_length", 2048)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
            name=str(self._get("general.name", self.path.stem)),
        )
        ffn = g("feed_forward_length")
        f32 = lambda x: float(str(np.float32(x)))  # GGUF stores float32: 9.99999974e-06 -> 1e-05
        if a == "gpt2":
            return ModelConfig(
                arch="gpt2", num_kv_heads=n_heads, head_dim=d // n_heads,
                intermediate_size=int(ffn) if ffn is not None else 4 * d,
                norm_eps=f32(g("attention.layer_norm_epsilon", 1e-5)), tie_embeddings=True,
                **common,
            )
        if "rope_freqs.weight" in names:
            raise ModelLoadError(
                f"{self.path}: tensor 'rope_freqs.weight' (Llama 3.1 RoPE scaling) is not supported "
                "from GGUF; load the Hugging Face folder instead"
            )
        scaling = g("rope.scaling.type")
        rope_scaling = None
        if a == "gemma3" and scaling == "linear":  # Gemma 3 4B+: global layers only
            rope_scaling = (("factor", f32(g("rope.scaling.factor", req=True))), ("rope_type", "linear"))
        elif scaling not in (None, "none"):
            raise ModelLoadError(f"{self.path}: {a}.rope.scaling.type = {scaling!r} is not supported")
        head_dim = int(g("attention.key_length", d // n_heads))
        gemma: dict[str, Any] = {}
        if a == "gemma3":
            window = int(g("attention.sliding_window", req=True))
            period = int(g("attention.sliding_window_pattern", _GEMMA3_PATTERN))
            gemma = dict(
                arch="gemma3", sliding_window=window,
                sliding_layers=ModelConfig.sliding_pattern(n_layers, period),
                rope_local_theta=f32(g("rope.freq_base_swa", _GEMMA3_LOCAL_BASE)),
                query_pre_attn_scalar=float(d // n_heads if n_layers == 62 else head_dim),
                qk_norm=True,
            )
        return ModelConfig(
            **{"arch": "llama", "qk_norm": "blk.0.attn_q_norm.weight" in names, **gemma},
            rope_scaling=rope_scaling,
            num_kv_heads=int(g("attention.head_count_kv", n_heads)), head_dim=head_dim,
            intermediate_size=int(g("feed_forward_length", req=True)),
            rope_theta=f32(g("rope.freq_base", 10000.0)),
            norm_eps=f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            **common,
        )

    def tokenizer(self):  # -> Tokenizer
        """The tokenizer described by the `tokenizer.*` metadata."""
        from jaxlora.io.tokenizer import Tokenizer

        keys = [k for k in self.reader.fields if k.startswith("tokenizer.")]
        if "tokenizer.ggml.tokens" not in keys:
            raise ModelLoadError(f"{self.path}: no tokenizer metadata (tokenizer.ggml.tokens)")
        meta = {k: self._get(k) for k in keys}
        meta["general.architecture"] = self.arch
        return Tokenizer.from_gguf_metadata(meta, source=str(self.path),
                                            chat_template=models.family(self.config).chat_template)

    # --- tensors ------------------------------------------------------------------------
    def tensors(self) -> Iterator[tuple[str, str, int | None, np.ndarray]]:
        """Yield `(gguf_name, design_path, layer_or_None, float32 array in JAX layout)`."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        cfg = self.config
        fam = models.family(cfg)
        names = {t.gguf: t for t in fam.tensors}
        tied_copy = fam.head_copy[1] if cfg.tie_embeddings else None
        permuted = self.arch in ("llama", "mistral")
        for t in self.reader.tensors:
            m = _BLOCK_RE.match(t.name)
            layer: int | None = None
            if m:
                layer = int(m.group(1))
                entry = names.get(f"blk.{{i}}.{m.group(2)}")
                if layer >= cfg.num_layers:
                    raise ModelLoadError(
                        f"{self.path}: tensor {t.name!r} has layer {layer} but block_count = {cfg.num_layers}"
                    )
            elif t.name == tied_copy:
                continue  # llama.cpp writes a copy of the tied embedding (GPT-2)
            else:
                entry = names.get(t.name)
            if entry is None:
                raise ModelLoadError(f"{self.path}: unexpected tensor {t.name!r} for architecture {self.arch!r}")
            qtype = GGMLQuantizationType(t.tensor_type)
            if qtype.name not in SUPPORTED_TENSOR_TYPES:
                raise ModelLoadError(f"{self.path}: tensor {t.name!r} has unsupported type {qtype.name}")
            try:
                # numpy shape is the reverse of GGUF's ne: [out, in] for a weight (torch layout).
                w = _dequantize_rows(t.data, qtype, dequantize)
                w = w.reshape(tuple(int(x) for x in reversed(t.shape)))
            except Exception as e:
                raise ModelLoadError(
                    f"{self.path}: cannot read tensor {t.name!r} ({qtype.name}, shape {list(t.shape)}): {e}"
                ) from None
            if fam.gguf_norm_shift and entry.path.endswith("/scale"):
                w = w - np.float32(fam.gguf_norm_shift)
            if permuted and entry.rope is not None:
                n = cfg.num_heads if entry.rope == "q" else cfg.num_kv_heads
                if w.shape[0] % (2 * n):
                    raise ModelLoadError(
                        f"{self.path}: tensor {t.name!r} has {w.shape[0]} rows, not a multiple of 2 * {n} heads"
                    )
                w = unpermute_qk(w, n)
            if entry.path.endswith("/kernel"):  # GGUF keeps torch's [out, in]
                if w.ndim != 2:
                    raise ModelLoadError(f"{self.path}: tensor {t.name!r} should be 2-D, has shape {list(w.shape)}")
                w = w.T
            yield t.name, entry.path, layer, w
