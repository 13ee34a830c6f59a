"""Files -> documents: JSONL records and plain text, tokenized with their label flags.

A `DocIndex` says where each document lives (file, byte offset, line) and its token length,
never its text: `index_documents` builds it in one tokenization pass, `read_document` reads one
document back and `tokenize_document` turns it into (tokens, labels). Record schemas, chat
rendering and the EOS rules are in the `jaxlora.data` docstring ("Documents and tokens").
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import numpy as np

from jaxlora.data.spec import TokenizerLike
from jaxlora.errors import DataError

__all__ = ["DocIndex", "index_documents", "read_document", "tokenize_document"]

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


class DocIndex(NamedTuple):
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
    where = f"{path}:{int(docs.line[i])}"
    return (*_parse_record(raw.decode("utf-8", errors="strict"), where), where)


def index_documents(files: list[str], tok: TokenizerLike, max_documents: int | None) -> DocIndex:
    """Read every file once: index its documents and their token lengths."""
    used: list[str] = []
    cols: dict[str, list] = {k: [] for k in ("file_idx", "offset", "line", "kind", "length", "tgt")}
    skipped = empty = n = 0
    notices: list[str] = []
    for path in files:
        if max_documents is not None and n >= max_documents:
            break
        rows: list[tuple] = []
        lineno = 0
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
                        ids, labels = tokenize_document(tok, kind, payload, f"{path}:{lineno}")
                        rows.append((line_off, lineno, kind, len(ids), int(labels.sum())))
                        if max_documents is not None and n + len(rows) >= max_documents:
                            break
                else:
                    ids, labels = tokenize_document(tok, _TEXT, f.read().decode("utf-8"), path)
                    rows.append((0, 0, _TEXT, len(ids), int(labels.sum())))
        except UnicodeDecodeError as e:
            skipped += 1
            where = f"{path}:{lineno}" if path.endswith(".jsonl") else path
            at = "of the line" if path.endswith(".jsonl") else "of the file"
            notices.append(f"{where}: file skipped: invalid UTF-8 at byte {e.start} {at}")
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

