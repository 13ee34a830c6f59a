"""The `Tokenizer`: a thin wrapper around a `tokenizers.Tokenizer` plus the chat template.

Built either from a `tokenizer.json` (Hugging Face folders) or from the metadata of a GGUF file
(`tokenizer.ggml.*`). For GGUF byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) the
pre-tokenizer is chosen from `tokenizer.ggml.pre` the way llama.cpp does (`llama-vocab.cpp`):
"smollm" (like "starcoder", "refact", "command-r") first isolates every digit, then applies the
GPT-2 split regex, which is exactly what SmolLM2's own `tokenizer.json` does
(`Digits(individual_digits=True)` then `ByteLevel`).

SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`) are read for Gemma files, the
way transformers builds Gemma's tokenizer from a GGUF (`gemma_tokenizer` in its GGUF
integration): a BPE with byte fallback over the vocabulary, spaces written as "▁" by the
normalizer, no prefix space; the file lists no merges, so they are recovered from the
vocabulary (every split of a token into two tokens), best first in the order the tokens appear
in the file (Gemma's scores do not follow its merge order); a token of spaces only is stored as
real spaces and is renamed to as many "▁". Control tokens are special, user-defined ones
(Gemma's runs of newlines, `[multimodal]`) are matched whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from jaxlora.errors import ModelLoadError

__all__ = ["Tokenizer"]

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (isolate single digits first?, split regex); see llama.cpp llama-vocab.cpp.
_GGUF_PRE: dict[str, tuple[bool, str]] = {
    "default": (False, _GPT2_SPLIT),
    "gpt-2": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "starcoder": (True, _GPT2_SPLIT),
    "refact": (True, _GPT2_SPLIT),
    "command-r": (True, _GPT2_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "llama-v3": (False, _LLAMA3_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "smaug-bpe": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in _GGUF_PRE:
        raise ModelLoadError(
            f"tokenizer.ggml.pre = {pre!r} is not supported (known: {', '.join(sorted(_GGUF_PRE))})"
        )
    digits, split = _GGUF_PRE[pre]
    steps: list[pre_tokenizers.PreTokenizer] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _byte_level_backend(meta: Mapping[str, Any], source: str) -> tuple[tokenizers.Tokenizer, list[str]]:
    """A byte-level BPE (`tokenizer.ggml.model == "gpt2"`) and its vocabulary as spelled."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = []
    for m in meta.get("tokenizer.ggml.merges", []):
        a, sep, b = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"{source}: bad merge {m!r} in tokenizer.ggml.merges")
        merges.append((a, b))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                              byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def sentencepiece_merges(vocab: Mapping[str, int], rank: Mapping[str, int]) -> list[tuple[str, str]]:
    """The BPE merges a merge-less vocabulary implies, best first.

    Every split of a token into two vocabulary tokens is a merge; merges are ordered by the
    merged token's `rank` (lower first), then by the longer left piece. This is the order of
    transformers' `generate_merges` with Gemma's file-order scores.
    """
    found = []
    for token, r in rank.items():
        for i in range(len(token) - 1, 0, -1):  # longer left piece first
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                found.append((r, left, right))
    found.sort(key=lambda m: m[0])  # stable: keeps the longer-left-first order within a token
    return [(left, right) for _, left, right in found]


def _sentencepiece_backend(meta: Mapping[str, Any], source: str) -> tuple[tokenizers.Tokenizer, list[str]]:
    """Gemma's SentencePiece BPE (see the module docstring) and its vocabulary as spelled."""
    arch = str(meta.get("general.architecture", ""))
    if not arch.startswith("gemma"):
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.model = 'llama' (SentencePiece) is supported for Gemma "
            f"files only, this one is {arch!r}"
        )
    spelled = list(meta["tokenizer.ggml.tokens"])
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in spelled]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else "<unk>"
    bpe = models.BPE(vocab=vocab, merges=sentencepiece_merges(vocab, vocab), fuse_unk=True,
                     unk_token=unk, byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, spelled


# tokenizer.ggml.model -> builder of (backend, the vocabulary as the file spells it).
_GGUF_MODELS: dict[str, Callable[[Mapping[str, Any], str], tuple[tokenizers.Tokenizer, list[str]]]] = {
    "gpt2": _byte_level_backend,
    "llama": _sentencepiece_backend,
}


def _raise_exception(message: str) -> None:
    raise ValueError(message)


class Tokenizer:
    """Text <-> token ids, special token ids, and the model's chat template.

    Args:
      backend: the `tokenizers.Tokenizer` that does the work.
      bos_id, eos_id, pad_id: special token ids (None when the model has none).
      chat_template: a Jinja2 template in the Hugging Face format, or None.
      add_bos, add_eos: whether `encode(..., add_special_tokens=True)` adds BOS / EOS.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.add_eos = add_eos
        self._compiled_template: Any = None

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, source: str = "<gguf>",
                           chat_template: str | None = None) -> Tokenizer:
        """Build from GGUF `tokenizer.ggml.*` metadata (values already decoded to Python).

        `general.architecture` may be in `meta` too (it picks the SentencePiece variant);
        `chat_template` is used when the metadata has none.
        """
        kind = meta.get("tokenizer.ggml.model")
        build = _GGUF_MODELS.get(kind) if isinstance(kind, str) else None
        if build is None:
            raise ModelLoadError(
                f"{source}: tokenizer.ggml.model = {kind!r} is not supported "
                f"(supported: {', '.join(repr(k) for k in _GGUF_MODELS)})"
            )
        backend, tokens = build(meta, source)
        types: list[int] = list(meta.get("tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens)))
        vocab = backend.get_vocab(with_added_tokens=False)
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=False)
            if ty == _TOKEN_CONTROL
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=False)
            if ty == _TOKEN_USER_DEFINED and t in vocab
        ]
        if special:
            backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)

        def _id(key: str) -> int | None:
            v = meta.get(key)
            return int(v) if v is not None else None

        return cls(
            backend,
            bos_id=_id("tokenizer.ggml.bos_token_id"),
            eos_id=_id("tokenizer.ggml.eos_token_id"),
            pad_id=_id("tokenizer.ggml.padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template") or chat_template,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], model_config: Mapping[str, Any] | None = None) -> Tokenizer:
        """Build from a Hugging Face folder: `tokenizer.json` (+ `tokenizer_config.json`,
        `chat_template.jinja`, `special_tokens_map.json` when present)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ModelLoadError(f"{path}: cannot read tokenizer: {e}") from None
        tcfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            tcfg = json.loads((folder / "tokenizer_config.json").read_text())
        if (folder / "special_tokens_map.json").is_file():
            for k, v in json.loads((folder / "special_tokens_map.json").read_text()).items():
                tcfg.setdefault(k, v)
        template = tcfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        model_config = model_config or {}

        def _id(name: str) -> int | None:
            tok = tcfg.get(name)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                i = backend.token_to_id(tok)
                if i is not None:
                    return i
            v = model_config.get(f"{name}_id")
            if isinstance(v, list):
                v = v[0] if v else None
            return int(v) if v is not None else None

        return cls(
            backend,
            bos_id=_id("bos_token"),
            eos_id=_id("eos_token"),
            pad_id=_id("pad_token"),
            chat_template=template,
            add_bos=bool(tcfg.get("add_bos_token", False)),
            add_eos=bool(tcfg.get("add_eos_token", False)),
        )

    @classmethod
    def byte_level(cls, chat_template: str | None = None) -> Tokenizer:
        """259 ids: `<unk>`, `<s>` (BOS), `</s>` (EOS, pad), then one per byte; no merges.

        The tokenizer of jaxlora's random `tiny-*` models and of tests that write models.
        """
        specials = ["<unk>", "<s>", "</s>"]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {t: i for i, t in enumerate(specials + alphabet)}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(specials)
        return cls(backend, bos_id=1, eos_id=2, pad_id=2, chat_template=chat_template)

    # --- use ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the model's config says."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id, *ids]
            if self.add_eos and self.eos_id is not None:
                ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        if not add_special_tokens:
            return [e.ids for e in encs]
        return [self.encode(t, add_special_tokens=True) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _token_str(self, i: int | None) -> str:
        if i is None:
            return ""
        return self.backend.id_to_token(i) or ""

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the chat template.

        Like transformers: a sandboxed Jinja2 environment with `trim_blocks` and
        `lstrip_blocks`, and `bos_token`, `eos_token`, `raise_exception` in scope.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template")
        if self._compiled_template is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
            )
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii
            )
            env.globals["raise_exception"] = _raise_exception
            self._compiled_template = env.from_string(self.chat_template)
        return self._compiled_template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_str(self.bos_id),
            eos_token=self._token_str(self.eos_id),
            **extra,
        )

    # --- export -------------------------------------------------------------------------
    def to_json(self) -> str:
        """The `tokenizer.json` text (the backend tokenizer only)."""
        return self.backend.to_str()

    def tokenizer_config(self) -> dict[str, Any]:
        """A `tokenizer_config.json` dict for Hugging Face export."""
        out: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None:
                out[name] = self._token_str(i)
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self.to_json(), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False), encoding="utf-8"
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})"
        )
