"""Corpora -> packed, loss-masked batches; deterministic and resumable.

Sources
    Each entry of `DataConfig.sources` is a file, a folder (all files below it, recursively,
    skipping hidden entries and ``__pycache__``), a glob (``**`` allowed), or
    ``stdlib:<glob>``: a glob relative to the running Python's standard-library source folder
    (``sysconfig.get_paths()["stdlib"]``; ``site-packages``/``dist-packages`` are excluded), so
    ``stdlib:json/*.py`` is the source of the :mod:`json` package, present offline everywhere.
    All matched files are de-duplicated and processed in sorted path order.

    A file ending in ``.jsonl`` holds one record per non-blank line, one of
      ``{"text": str}``                      loss on every token;
      ``{"prompt": str, "completion": str}`` loss on the completion (and its EOS) only;
      ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template,
                                             loss on assistant content + its end-of-turn token.
    Any other file is one plain-text document (loss on every token).

Documents and tokens
    A document is ``encode(text) + [eos]`` (prompt/completion: ``encode(prompt) +
    encode(completion) + [eos]``; chat: the template pieces, each encoded on its own, so the
    loss mask falls exactly on token boundaries). Empty documents are dropped (counted).
    Each token carries a *label* flag: may it be a prediction target?

Packing (``pack=True``)
    An epoch's documents (shuffled per epoch when ``shuffle``) are concatenated into one token
    stream; row ``r`` holds stream tokens ``[r*T, r*T + T]`` (``T = seq_len``, ``T+1`` tokens:
    inputs are the first ``T``, targets the last ``T``; consecutive rows share one token so that
    every next-token transition is trained exactly once). Within a row each document piece gets
    its own segment id (1, 2, ... in order; 0 = padding) and positions restart at 0, so a
    segment-masked causal attention never crosses documents. ``loss_mask[t]`` is 1 only when
    ``targets[t]`` is labelled *and* lies in the same document as ``inputs[t]``: the first token
    of a document is never predicted from the previous document's EOS.

    A document longer than a row (or one that straddles a row boundary) is split: its
    continuation in the next row starts a *new* segment whose positions restart at 0. The
    earlier chunk sits in another row and cannot be attended to anyway; continuing the
    positions would buy nothing for RoPE models (relative positions) and would overflow the
    position table of absolute-position models (GPT-2) on long documents.

    The last row of an epoch is padded (inputs/targets = pad id, loss_mask 0, segment 0,
    position 0), and the last batch of an epoch is filled with all-padding rows, so every
    batch has the static shape ``[batch_size, seq_len]`` and no token is dropped.
    With ``pack=False`` each document is windowed the same way on its own (one document per
    row, the tail of each row padded).

Determinism and resumption
    Epoch ``e`` orders documents by ``default_rng([seed, e]).permutation`` (sorted order when
    ``shuffle=False``). Only token *lengths* (computed in one scan at load) decide the layout,
    so batch ``(epoch, index)`` is built directly: reading and tokenizing just the documents it
    needs (a small LRU cache holds recently tokenized documents; the corpus text is never held
    in memory). Loading therefore costs one tokenization pass over the corpus (the whole
    standard library, ~25 MB of source, takes about a minute on one core; a module subset,
    seconds). The iterator position is ``IteratorState(epoch, index)``; resuming from a saved
    state yields the identical continuation.

Errors are `jaxlora.errors.DataError` with one line naming the file (and line).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import math
import os
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from jaxlora import schema
from jaxlora.errors import DataError

__all__ = [
    "Batch",
    "DataConfig",
    "DataIterator",
    "DataStats",
    "Dataset",
    "Datasets",
    "IteratorState",
    "TokenizerLike",
    "check_seq_len",
    "load_datasets",
    "resolve_sources",
]

_TEXT, _PLAIN_JSONL, _PROMPT, _CHAT = 0, 1, 2, 3  # document kinds
_CACHE_DOCS = 64  # tokenized documents kept in the LRU cache


@runtime_checkable
class TokenizerLike(Protocol):
    """What data needs from a tokenizer (`jaxlora.io.Tokenizer` provides it)."""

    eos_id: int
    bos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> str: ...


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training and validation corpora, packed into fixed-length batches.

    The ``[data]`` table of a config file. Inputs and targets are ``[batch_size, seq_len]``.
    """

    sources: tuple[str, ...] = schema.field(
        (), "Training data: files, folders, globs or 'stdlib:<glob>'; .jsonl holds text, "
        "prompt/completion or chat records."
    )
    validation_sources: tuple[str, ...] = schema.field(
        (), "Held-out data (its files leave `sources`); when empty, `validation_fraction` of the "
        "documents is held out."
    )
    validation_fraction: float = schema.field(
        0.05, "Fraction of documents held out for validation when no validation_sources "
        "(seeded, by document).", ge=0, lt=1
    )
    seq_len: int = schema.field(256, "Tokens per packed training sequence.", ge=2)
    batch_size: int = schema.field(8, "Sequences per micro-batch (one jitted step).", ge=1)
    seed: int = schema.field(0, "Seed of the document shuffle and the train/validation split.", ge=0)
    shuffle: bool = schema.field(True, "Shuffle documents each epoch (deterministic in `seed`).")
    max_documents: int | None = schema.field(
        None, "Use only the first N documents in sorted file order, per source set (0 = all).",
        ge=0, none=0,
    )
    pack: bool = schema.field(
        True, "Concatenate documents into full rows (false: one document per row)."
    )

    def __post_init__(self):
        for name in ("sources", "validation_sources"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise DataError(f"data.seq_len must be a positive integer, got {self.seq_len!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise DataError(f"data.batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(
                f"data.validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        if self.max_documents == 0:  # the TOML spelling of "all"
            object.__setattr__(self, "max_documents", None)
        if self.max_documents is not None and self.max_documents < 0:
            raise DataError(f"data.max_documents must be positive, got {self.max_documents!r}")


class Batch(NamedTuple):
    """One batch (numpy, host memory). ``B = batch_size``, ``T = seq_len``."""

    inputs: np.ndarray  # int32 [B, T] token ids fed to the model
    targets: np.ndarray  # int32 [B, T] next token for each input position
    loss_mask: np.ndarray  # float32 [B, T] 1 where targets[b, t] is trained
    segment_ids: np.ndarray  # int32 [B, T] document piece within the row, 1.. ; 0 = padding
    positions: np.ndarray  # int32 [B, T] position within the document piece, from 0


class IteratorState(NamedTuple):
    """Where a training iterator stands: the next batch is ``index`` of ``epoch``."""

    epoch: int = 0
    index: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> IteratorState:
        return cls(int(d["epoch"]), int(d["index"]))


class DataStats(NamedTuple):
    files: int  # files that contributed documents
    skipped_files: int  # files skipped for invalid UTF-8 (while scanning this split's sources)
    documents: int
    empty_documents: int  # documents that tokenized to nothing (dropped)
    tokens: int  # including one EOS per document
    target_tokens: int  # labelled tokens (those that may carry loss)
    sequences: int  # rows per epoch
    batches: int  # batches per epoch


def check_seq_len(seq_len: int, max_positions: int) -> None:
    """Raise DataError when rows are longer than the model's context."""
    if seq_len > max_positions:
        raise DataError(
            f"data.seq_len = {seq_len} exceeds the model's context of {max_positions} positions"
        )


# ----------------------------------------------------------------------------- sources


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        out.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return out


def resolve_sources(sources: Sequence[str]) -> list[str]:
    """Files named by `sources` (see the module docstring), de-duplicated, sorted."""
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


# ----------------------------------------------------------------------------- documents


def _chat_pieces(tok: TokenizerLike, messages: list[dict], where: str) -> list[tuple[str, int]]:
    """Split a rendered conversation into (text, trainable) pieces.

    Renders growing prefixes of the conversation; an assistant turn spans from the end of the
    generation prompt to the end of its rendering. Within it the message content is trainable,
    and of the closing text only its first token (the end-of-turn token, e.g. ``<|im_end|>``),
    flagged by the value 2, so the model learns to stop.
    """
    # add_generation_prompt is always explicit: jaxlora.io.Tokenizer defaults it to True
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    pieces: list[tuple[str, int]] = []
    done = 0  # characters of `full` already assigned
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        end = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(end) and end.startswith(start) and len(start) >= done):
            raise DataError(f"{where}: chat template does not render prefixes consistently")
        pieces.append((full[done : len(start)], 0))
        span = end[len(start) :]
        content = msg["content"]
        if content and span.startswith(content):
            pieces.append((content, 1))
            pieces.append((span[len(content) :], 2))
        else:  # the template rewrote the content: train on the whole turn
            pieces.append((span, 1))
        done = len(end)
    pieces.append((full[done:], 0))
    return pieces


def _parse_record(line: str, where: str) -> tuple[int, Any]:
    """(kind, payload) of one JSONL line; DataError naming `where` (file:line) if bad."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(rec, dict):
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            ):
                raise DataError(f"{where}: 'messages' must be a list of {{role, content}} strings")
            return _CHAT, msgs
        if "prompt" in rec and "completion" in rec:
            if not (isinstance(rec["prompt"], str) and isinstance(rec["completion"], str)):
                raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
            return _PROMPT, (rec["prompt"], rec["completion"])
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise DataError(f"{where}: 'text' must be a string")
            return _PLAIN_JSONL, rec["text"]
        keys = sorted(rec)
    else:
        keys = type(rec).__name__
    raise DataError(
        f"{where}: unknown record schema {keys}; expected {{text}}, {{prompt, completion}} "
        "or {messages}"
    )


def _tokenize(tok: TokenizerLike, kind: int, payload: Any, where: str):
    """(tokens int32 [n], labels bool [n]) of one document, EOS appended; n = 0 if empty."""
    if kind in (_TEXT, _PLAIN_JSONL):
        ids = list(tok.encode(payload, add_special_tokens=False))
        labels = [True] * len(ids)
    elif kind == _PROMPT:
        p = list(tok.encode(payload[0], add_special_tokens=False))
        c = list(tok.encode(payload[1], add_special_tokens=False))
        ids, labels = p + c, [False] * len(p) + [True] * len(c)
    else:
        ids, labels = [], []
        for text, flag in _chat_pieces(tok, payload, where):
            piece = list(tok.encode(text, add_special_tokens=False)) if text else []
            ids += piece
            if flag == 2:  # closing text: only the end-of-turn token is trained
                labels += [True] + [False] * (len(piece) - 1) if piece else []
            else:
                labels += [bool(flag)] * len(piece)
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, bool)
    ids.append(tok.eos_id)
    # The separating EOS is a target after text and completions (learn to stop); a chat
    # already ends its turns with the end-of-turn token, so there it only separates documents.
    labels.append(kind != _CHAT and any(labels))
    return np.asarray(ids, np.int32), np.asarray(labels, bool)


class _Docs(NamedTuple):
    """Index of documents: where each lives and its token length (never the text)."""

    files: tuple[str, ...]
    file_idx: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n] byte offset of the JSONL line (0 for text files)
    line: np.ndarray  # int32 [n] 1-based line number (0 for text files)
    kind: np.ndarray  # int8 [n]
    length: np.ndarray  # int64 [n] tokens incl. EOS
    targets: np.ndarray  # int64 [n] labelled tokens
    skipped_files: int
    empty_documents: int

    def take(self, idx: np.ndarray) -> _Docs:
        return self._replace(
            file_idx=self.file_idx[idx],
            offset=self.offset[idx],
            line=self.line[idx],
            kind=self.kind[idx],
            length=self.length[idx],
            targets=self.targets[idx],
        )


def _read_doc(docs: _Docs, i: int) -> tuple[int, Any, str]:
    path = docs.files[docs.file_idx[i]]
    kind = int(docs.kind[i])
    try:
        if kind == _TEXT:
            with open(path, "rb") as f:
                return kind, f.read().decode("utf-8"), path
        with open(path, "rb") as f:
            f.seek(int(docs.offset[i]))
            raw = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read any more: {e}") from None
    where = f"{path}:{int(docs.line[i])}"
    return (*_parse_record(raw.decode("utf-8", errors="strict"), where), where)


def _scan(files: list[str], tok: TokenizerLike, max_documents: int | None) -> _Docs:
    """Read every file once: index its documents and their token lengths."""
    used: list[str] = []
    cols: dict[str, list] = {k: [] for k in ("file_idx", "offset", "line", "kind", "length", "tgt")}
    skipped = empty = n = 0
    for path in files:
        if max_documents is not None and n >= max_documents:
            break
        rows: list[tuple] = []
        try:
            with open(path, "rb") as f:
                if path.endswith(".jsonl"):
                    offset = 0
                    for lineno, raw in enumerate(f, start=1):
                        line_off, offset = offset, offset + len(raw)
                        line = raw.decode("utf-8")  # may raise: the file is skipped
                        if not line.strip():
                            continue
                        kind, payload = _parse_record(line, f"{path}:{lineno}")
                        ids, labels = _tokenize(tok, kind, payload, f"{path}:{lineno}")
                        rows.append((line_off, lineno, kind, len(ids), int(labels.sum())))
                        if max_documents is not None and n + len(rows) >= max_documents:
                            break
                else:
                    ids, labels = _tokenize(tok, _TEXT, f.read().decode("utf-8"), path)
                    rows.append((0, 0, _TEXT, len(ids), int(labels.sum())))
        except UnicodeDecodeError:
            skipped += 1
            continue
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
        kept = [r for r in rows if r[3] > 0]
        empty += len(rows) - len(kept)
        n += len(rows)
        if not kept:
            continue
        used.append(path)
        for off, lineno, kind, length, tgt in kept:
            for k, v in zip(cols, (len(used) - 1, off, lineno, kind, length, tgt), strict=True):
                cols[k].append(v)
    return _Docs(
        files=tuple(used),
        file_idx=np.asarray(cols["file_idx"], np.int32),
        offset=np.asarray(cols["offset"], np.int64),
        line=np.asarray(cols["line"], np.int32),
        kind=np.asarray(cols["kind"], np.int8),
        length=np.asarray(cols["length"], np.int64),
        targets=np.asarray(cols["tgt"], np.int64),
        skipped_files=skipped,
        empty_documents=empty,
    )


# ----------------------------------------------------------------------------- dataset


class _Layout(NamedTuple):
    order: np.ndarray  # [n_docs] document ids in stream order
    doc_start: np.ndarray  # [n_docs + 1] stream offset of each document (cumsum)
    row_start: np.ndarray  # [rows] stream offset of each row's first token
    row_end: np.ndarray  # [rows] stream offset one past each row's last token (<= start+T+1)


class Dataset:
    """One split (train or validation) of a corpus; build it with `load_datasets`."""

    def __init__(self, docs: _Docs, tokenizer: TokenizerLike, config: DataConfig, name: str):
        if len(docs.length) == 0:
            raise DataError(
                f"{name} dataset is empty: no documents with tokens "
                f"({docs.skipped_files} files skipped for invalid UTF-8)"
            )
        self.name = name
        self.config = config
        self.tokenizer = tokenizer
        self._docs = docs
        self._pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict()
        )
        self._layouts: collections.OrderedDict[tuple[int, bool], _Layout] = (
            collections.OrderedDict()
        )
        rows = len(self._layout(0, shuffle=False).row_start)  # same count every epoch
        self.stats = DataStats(
            files=len(self.files),
            skipped_files=docs.skipped_files,
            documents=len(docs.length),
            empty_documents=docs.empty_documents,
            tokens=int(docs.length.sum()),
            target_tokens=int(docs.targets.sum()),
            sequences=rows,
            batches=math.ceil(rows / config.batch_size),
        )

    @property
    def batches_per_epoch(self) -> int:
        return self.stats.batches

    @property
    def files(self) -> tuple[str, ...]:
        """The files that hold this split's documents, sorted."""
        return tuple(self._docs.files[i] for i in np.unique(self._docs.file_idx))

    def check(self, max_positions: int) -> None:
        """Raise DataError when `seq_len` exceeds the model's context `max_positions`."""
        check_seq_len(self.config.seq_len, max_positions)

    # -- layout: which stream range each row covers (lengths only, no text)

    def _layout(self, epoch: int, shuffle: bool) -> _Layout:
        key = (epoch, shuffle)
        if key in self._layouts:
            return self._layouts[key]
        n, T = len(self._docs.length), self.config.seq_len
        if shuffle:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        lens = self._docs.length[order]
        doc_start = np.concatenate([[0], np.cumsum(lens)])
        if self.config.pack:
            total = int(doc_start[-1])
            row_start = np.arange(0, max(total - 1, 1), T, dtype=np.int64)
            row_end = np.minimum(row_start + T + 1, total)
        else:  # each document windowed on its own; a 1-token document still gets one row
            per_doc = np.maximum(1, -(-(lens - 1) // T))
            doc_of_row = np.repeat(np.arange(n), per_doc)
            first_row = np.concatenate([[0], np.cumsum(per_doc)])[:-1]
            k = np.arange(len(doc_of_row)) - first_row[doc_of_row]
            row_start = doc_start[doc_of_row] + k * T
            row_end = np.minimum(row_start + T + 1, doc_start[doc_of_row + 1])
        layout = _Layout(order, doc_start, row_start, row_end)
        self._layouts[key] = layout
        while len(self._layouts) > 2:
            self._layouts.popitem(last=False)
        return layout

    def _doc_tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        kind, payload, where = _read_doc(self._docs, i)
        ids, labels = _tokenize(self.tokenizer, kind, payload, where)
        if len(ids) != self._docs.length[i]:
            raise DataError(f"{where}: document changed since the dataset was indexed")
        self._cache[i] = (ids, labels)
        while len(self._cache) > _CACHE_DOCS:
            self._cache.popitem(last=False)
        return ids, labels

    def _row(self, layout: _Layout, r: int, out: Batch, b: int) -> None:
        """Write row `r` of `layout` into batch slot `b` (slot already padding-filled)."""
        a, e = int(layout.row_start[r]), int(layout.row_end[r])
        toks = np.empty(e - a, np.int32)
        labels = np.empty(e - a, bool)
        seg_of = np.empty(e - a, np.int32)  # segment of each of the row's tokens
        pos_of = np.empty(e - a, np.int32)
        k = int(np.searchsorted(layout.doc_start, a, side="right")) - 1
        seg, cur = 0, a
        while cur < e:
            ds, de = int(layout.doc_start[k]), int(layout.doc_start[k + 1])
            lo, hi = cur - a, min(e, de) - a
            ids, lab = self._doc_tokens(int(layout.order[k]))
            toks[lo:hi] = ids[cur - ds : cur - ds + hi - lo]
            labels[lo:hi] = lab[cur - ds : cur - ds + hi - lo]
            seg += 1
            seg_of[lo:hi] = seg
            pos_of[lo:hi] = np.arange(hi - lo)
            cur, k = a + hi, k + 1
        n = len(toks) - 1  # real input positions (each has a real target)
        out.inputs[b, :n] = toks[:-1]
        out.targets[b, :n] = toks[1:]
        out.segment_ids[b, :n] = seg_of[:-1]
        out.positions[b, :n] = pos_of[:-1]
        out.loss_mask[b, :n] = labels[1:] & (seg_of[1:] == seg_of[:-1])

    def _batch(self, layout: _Layout, index: int) -> Batch:
        B, T = self.config.batch_size, self.config.seq_len
        out = Batch(
            inputs=np.full((B, T), self._pad, np.int32),
            targets=np.full((B, T), self._pad, np.int32),
            loss_mask=np.zeros((B, T), np.float32),
            segment_ids=np.zeros((B, T), np.int32),
            positions=np.zeros((B, T), np.int32),
        )
        rows = len(layout.row_start)
        for b in range(B):
            r = index * B + b
            if r < rows:
                self._row(layout, r, out, b)
        return out

    # -- public iteration

    def batch(self, epoch: int, index: int) -> Batch:
        """Training batch `index` of `epoch` (the one an iterator at that state yields)."""
        if not 0 <= index < self.batches_per_epoch or epoch < 0:
            raise DataError(
                f"{self.name} dataset: no batch (epoch={epoch}, index={index}); an epoch has "
                f"{self.batches_per_epoch} batches"
            )
        return self._batch(self._layout(epoch, self.config.shuffle), index)

    def iterator(self, state: IteratorState | Mapping[str, int] | None = None) -> DataIterator:
        """Endless training iterator starting at `state` (default: the very beginning)."""
        if state is None:
            state = IteratorState()
        elif isinstance(state, Mapping):
            state = IteratorState.from_dict(state)
        else:
            state = IteratorState(int(state[0]), int(state[1]))
        if state.epoch < 0 or not 0 <= state.index < self.batches_per_epoch:
            raise DataError(
                f"iterator state {state.as_dict()} does not fit the {self.name} dataset "
                f"({self.batches_per_epoch} batches per epoch)"
            )
        return DataIterator(self, state)

    def eval_batches(self) -> Iterator[Batch]:
        """One finite, deterministic pass over the split in sorted document order."""
        layout = self._layout(0, shuffle=False)
        for i in range(self.batches_per_epoch):
            yield self._batch(layout, i)


class DataIterator:
    """Yields training `Batch`es forever; `state()` is where it stands (plain ints)."""

    def __init__(self, dataset: Dataset, state: IteratorState):
        self._ds = dataset
        self._state = state

    def state(self) -> IteratorState:
        """The position of the *next* batch; `dataset.iterator(state)` resumes there."""
        return self._state

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        epoch, index = self._state
        batch = self._ds.batch(epoch, index)
        index += 1
        if index == self._ds.batches_per_epoch:
            epoch, index = epoch + 1, 0
        self._state = IteratorState(epoch, index)
        return batch


class Datasets(NamedTuple):
    train: Dataset
    validation: Dataset | None  # None when neither validation_sources nor a fraction is set


def load_datasets(
    config: DataConfig, tokenizer: TokenizerLike, *, max_positions: int | None = None
) -> Datasets:
    """Index the corpus (one streamed tokenization pass) and split it by document.

    With `validation_sources`, those files form the validation split and are removed from the
    training files; otherwise `validation_fraction` of the documents (at least one) is held out
    by a seeded draw. `max_positions` (the model's context) is checked against `seq_len`.
    """
    if not config.sources:
        raise DataError("data.sources: no sources given")
    if max_positions is not None:
        check_seq_len(config.seq_len, max_positions)
    train_files = resolve_sources(config.sources)
    if config.validation_sources:
        val_files = resolve_sources(config.validation_sources)
        held = set(val_files)
        train_files = [f for f in train_files if f not in held]
        if not train_files:
            raise DataError("data.sources: every file is also a validation source")
        train_docs = _scan(train_files, tokenizer, config.max_documents)
        val_docs = _scan(val_files, tokenizer, config.max_documents)
        return Datasets(
            Dataset(train_docs, tokenizer, config, "training"),
            Dataset(val_docs, tokenizer, config, "validation"),
        )
    docs = _scan(train_files, tokenizer, config.max_documents)
    if config.validation_fraction == 0.0:
        return Datasets(Dataset(docs, tokenizer, config, "training"), None)
    n = len(docs.length)
    n_val = max(1, round(config.validation_fraction * n))
    if n_val >= n:
        raise DataError(
            f"data.validation_fraction = {config.validation_fraction} leaves no training "
            f"documents out of {n}"
        )
    perm = np.random.default_rng([config.seed, 0x5EED]).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return Datasets(
        Dataset(docs.take(train_idx), tokenizer, config, "training"),
        Dataset(docs.take(val_idx), tokenizer, config, "validation"),
    )
