"""Files -> documents: JSONL records and plain text, tokenized with their label flags.

A `DocIndex` says where each document lives (file, byte offset, line) and its token length,
never its text: `index_documents` builds it in one tokenization pass over one host's part of
the corpus (`host_ranges`), `read_document` reads one document back and `tokenize_document`
turns it into (tokens, labels). Record schemas, chat rendering, the EOS rules and the hosts'
parts are in the `jaxlora.data` docstring ("Documents and tokens", "Hosts").
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from jaxlora.data.spec import TokenizerLike
from jaxlora.errors import DataError

__all__ = ["DocIndex", "host_ranges", "index_documents", "read_document", "tokenize_document"]

_TEXT, _PLAIN_JSONL, _PROMPT, _CHAT = 0, 1, 2, 3  # document kinds
ROLES = ("system", "user", "assistant", "tool")  # chat roles; any other is an error


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
            for m in msgs:  # an unknown role would train on nothing, or on the wrong turns
                if m["role"] not in ROLES:
                    raise DataError(
                        f"{where}: unknown chat role {m['role']!r}; expected one of "
                        f"{', '.join(ROLES)}"
                    )
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


def tokenize_document(tok: TokenizerLike, kind: int, payload: Any, where: str):
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


def _where(path: str, line: int, offset: int) -> str:
    """`path:line`, or the line's byte offset where its number is unknown (a host's part of a
    file that starts after its first line: counting the lines before it would read them)."""
    return f"{path}:{line}" if line else f"{path}: the line at byte {offset}"


class DocIndex(NamedTuple):
    """Index of documents: where each lives and its token length (never the text)."""

    files: tuple[str, ...]
    file_idx: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n] byte offset of the JSONL line (0 for text files)
    line: np.ndarray  # int32 [n] 1-based line number (0: a text file, or not counted)
    kind: np.ndarray  # int8 [n]
    length: np.ndarray  # int64 [n] tokens incl. EOS
    targets: np.ndarray  # int64 [n] labelled tokens
    skipped_files: int
    empty_documents: int
    sources: tuple[str, ...] = ()  # every file scanned, used or not
    notices: tuple[str, ...] = ()  # one line per skipped file: path, line and reason

    def take(self, idx: np.ndarray) -> DocIndex:
        return self._replace(
            file_idx=self.file_idx[idx],
            offset=self.offset[idx],
            line=self.line[idx],
            kind=self.kind[idx],
            length=self.length[idx],
            targets=self.targets[idx],
        )


def read_document(docs: DocIndex, i: int) -> tuple[int, Any, str]:
    """(kind, payload, where) of document `i`, read back from its file; `where` names it."""
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
    where = _where(path, int(docs.line[i]), int(docs.offset[i]))
    return (*_parse_record(raw.decode("utf-8", errors="strict"), where), where)


def host_ranges(files: list[str], part: tuple[int, int]) -> list[tuple[str, int, int | None]]:
    """(path, start, stop) byte ranges of host `index` of `count`'s part of `files`.

    The files, in the order given, are one byte stream cut into `count` equal ranges; a host
    owns the JSONL lines that start in its range and the plain-text files whose first byte is
    in it, so it opens only the files its range touches and never reads past the line that
    straddles its end. Only file sizes are read for the others. (0, 1) is every file whole.
    """
    index, count = part
    if count == 1:
        return [(path, 0, None) for path in files]
    try:
        sizes = [os.path.getsize(path) for path in files]
    except OSError as e:
        raise DataError(f"{e.filename}: cannot read: {e.strerror or e}") from None
    total = sum(sizes)
    lo, hi = index * total // count, (index + 1) * total // count
    ranges, base = [], 0
    for path, size in zip(files, sizes, strict=True):
        if path.endswith(".jsonl"):
            a, b = max(lo - base, 0), min(hi - base, size)
            if a < b:
                ranges.append((path, a, b))
        elif lo <= base < hi:
            ranges.append((path, 0, None))
        base += size
    return ranges


def _lines(f, start: int, stop: int | None):
    """(byte offset, raw line) of the lines of binary file `f` that start in [start, stop)."""
    if start:
        f.seek(start - 1)
        f.readline()  # the rest of the line that straddles `start` (just its newline if any)
    offset = f.tell()
    while stop is None or offset < stop:
        raw = f.readline()
        if not raw:
            return
        yield offset, raw
        offset += len(raw)


def index_documents(files: list[str], tok: TokenizerLike, max_documents: int | None,
                    part: tuple[int, int] = (0, 1)) -> DocIndex:
    """Read this host's part of the files once (`host_ranges`): index its documents and their
    token lengths. `max_documents` caps the documents this call indexes."""
    used: list[str] = []
    cols: dict[str, list] = {k: [] for k in ("file_idx", "offset", "line", "kind", "length", "tgt")}
    skipped = empty = n = 0
    notices: list[str] = []
    for path, start, stop in host_ranges(files, part):
        if max_documents is not None and n >= max_documents:
            break
        rows: list[tuple] = []
        lineno, where = 0, path
        try:
            with open(path, "rb") as f:
                if path.endswith(".jsonl"):
                    for k, (line_off, raw) in enumerate(_lines(f, start, stop), start=1):
                        lineno = 0 if start else k
                        where = _where(path, lineno, line_off)
                        line = raw.decode("utf-8")  # may raise: the file is skipped
                        if not line.strip():
                            continue
                        kind, payload = _parse_record(line, where)
                        ids, labels = tokenize_document(tok, kind, payload, where)
                        rows.append((line_off, lineno, kind, len(ids), int(labels.sum())))
                        if max_documents is not None and n + len(rows) >= max_documents:
                            break
                else:
                    ids, labels = tokenize_document(tok, _TEXT, f.read().decode("utf-8"), path)
                    rows.append((0, 0, _TEXT, len(ids), int(labels.sum())))
        except UnicodeDecodeError as e:
            skipped += 1
            at = "of the line" if path.endswith(".jsonl") else "of the file"
            what = "file skipped" if not start else "this host's part of the file skipped"
            notices.append(f"{where}: {what}: invalid UTF-8 at byte {e.start} {at}")
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
    return DocIndex(
        files=tuple(used),
        file_idx=np.asarray(cols["file_idx"], np.int32),
        offset=np.asarray(cols["offset"], np.int64),
        line=np.asarray(cols["line"], np.int32),
        kind=np.asarray(cols["kind"], np.int8),
        length=np.asarray(cols["length"], np.int64),
        targets=np.asarray(cols["tgt"], np.int64),
        skipped_files=skipped,
        empty_documents=empty,
        sources=tuple(files),
        notices=tuple(notices),
    )

