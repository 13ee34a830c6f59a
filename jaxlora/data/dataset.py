"""Documents -> batches: the row layout of an epoch, `Dataset`, its iterator, and the split.

`load_datasets` indexes the corpus and splits it by document into `Datasets`; a `Dataset`
(counted by its `DataStats`) lays out each epoch from token lengths alone and builds any
batch ``(epoch, index)`` directly (packing, masks and resumption as the `jaxlora.data`
docstring describes).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np

from jaxlora.data.documents import DocIndex, index_documents, read_document, tokenize_document
from jaxlora.data.sources import resolve_sources
from jaxlora.data.spec import Batch, DataConfig, IteratorState, TokenizerLike, check_seq_len
from jaxlora.errors import DataError

__all__ = ["DataIterator", "DataStats", "Dataset", "Datasets", "host_datasets", "load_datasets"]

_CACHE_DOCS = 64  # tokenized documents kept in the LRU cache


class DataStats(NamedTuple):
    """What one split holds, counted when it is loaded (`Dataset.stats`)."""

    files: int  # files that contributed documents
    skipped_files: int  # files skipped for invalid UTF-8 (while scanning this split's sources)
    documents: int
    empty_documents: int  # documents that tokenized to nothing (dropped)
    tokens: int  # including one EOS per document
    target_tokens: int  # labelled tokens (those that may carry loss)
    sequences: int  # rows per epoch
    batches: int  # batches per epoch
    notices: tuple[str, ...] = ()  # one line per skipped file (path, line, reason)


def _names(files: tuple[str, ...], n: int = 3) -> str:
    """The first `n` of `files` (and how many more), for an error message."""
    more = f" and {len(files) - n} more" if len(files) > n else ""
    return (", ".join(files[:n]) or "no files") + more


class _Layout(NamedTuple):
    order: np.ndarray  # [n_docs] document ids in stream order
    doc_start: np.ndarray  # [n_docs + 1] stream offset of each document (cumsum)
    row_start: np.ndarray  # [rows] stream offset of each row's first token
    row_end: np.ndarray  # [rows] stream offset one past each row's last token (<= start+T+1)


def _check_split(name: str, docs: DocIndex, documents: int, targets: int) -> None:
    """Refuse a split (all hosts' documents and labelled tokens counted) with nothing in it."""
    if documents == 0:
        raise DataError(
            f"{name} dataset is empty: no documents with tokens in "
            f"{_names(docs.sources)} ({docs.skipped_files} files skipped for invalid UTF-8)"
            + "".join(f"; {n}" for n in docs.notices)
        )
    if targets == 0:  # e.g. chats without assistant turns: a loss of exactly 0
        raise DataError(
            f"{name} dataset has no tokens to learn from in {_names(docs.files or docs.sources)}"
            " (prompts without completions, or chats without assistant turns)"
        )


class Dataset:
    """One split (train or validation) of a corpus; build it with `load_datasets`."""

    def __init__(self, docs: DocIndex, tokenizer: TokenizerLike, config: DataConfig, name: str,
                 min_batches: int = 0):
        """`min_batches` > 0: one host's part of a split (the hosts' checks done together),
        which may hold no documents at all and has at least that many batches per epoch."""
        if min_batches == 0:  # one host: its documents are the split's
            _check_split(name, docs, len(docs.length), int(docs.targets.sum()))
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
            # at least `min_batches`: the hosts of a multi-host run step together
            batches=max(math.ceil(rows / config.batch_size), min_batches),
            notices=docs.notices,
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
            row_start = np.arange(0, max(total - 1, 1) if total else 0, T, dtype=np.int64)
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
        kind, payload, where = read_document(self._docs, i)
        ids, labels = tokenize_document(self.tokenizer, kind, payload, where)
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


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
        np.uint64(0x94D049BB133111EB))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of a uint64 array (wrapping arithmetic, element by element)."""
    x = x + _MIX[0]
    x = (x ^ (x >> np.uint64(30))) * _MIX[1]
    x = (x ^ (x >> np.uint64(27))) * _MIX[2]
    return x ^ (x >> np.uint64(31))


def _held_out(docs: DocIndex, fraction: float, seed: int) -> np.ndarray:
    """bool [n]: this host's documents held out for validation in a multi-host run.

    Each document is drawn alone, from a seeded hash of its file's position among the sources
    and its byte offset, so a host decides for its own documents without seeing the others'.
    At least one document is held out and one kept on each host that has two or more.
    """
    if not len(docs.length):
        return np.zeros(0, bool)
    position = {f: i for i, f in enumerate(docs.sources)}
    source = np.asarray([position[f] for f in docs.files], np.uint64)[docs.file_idx]
    h = _mix(_mix(_mix(np.full(len(source), seed % 2**64, np.uint64)) ^ source)
             ^ docs.offset.astype(np.uint64))
    u = (h >> np.uint64(11)).astype(np.float64) / 2.0**53
    held = u < fraction
    if len(u) > 1 and not held.any():
        held[np.argmin(u)] = True
    if len(u) > 1 and held.all():
        held[np.argmax(u)] = False
    return held


def _split_docs(config: DataConfig, tokenizer: TokenizerLike,
                part: tuple[int, int]) -> tuple[DocIndex, DocIndex | None]:
    """This host's (training, validation) documents (validation None: no split asked for)."""
    index, count = part
    cap = config.max_documents if config.max_documents is None or count == 1 else (
        -(-config.max_documents // count))  # each host's share of the cap
    train_files = resolve_sources(config.sources)
    if config.validation_sources:
        val_files = resolve_sources(config.validation_sources)
        held = set(val_files)
        train_files = [f for f in train_files if f not in held]
        if not train_files:
            raise DataError("data.sources: every file is also a validation source")
        return (index_documents(train_files, tokenizer, cap, part),
                index_documents(val_files, tokenizer, cap, part))
    docs = index_documents(train_files, tokenizer, cap, part)
    if config.validation_fraction == 0.0:
        return docs, None
    if count > 1:
        held = _held_out(docs, config.validation_fraction, config.seed)
        return docs.take(~held), docs.take(held)
    n = len(docs.length)
    n_val = max(1, round(config.validation_fraction * n))
    if n_val >= n:
        raise DataError(
            f"data.validation_fraction = {config.validation_fraction} leaves no training "
            f"documents out of {n}"
        )
    perm = np.random.default_rng([config.seed, 0x5EED]).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return docs.take(train_idx), docs.take(val_idx)


def _check_hosts(config: DataConfig, count: int) -> None:
    if config.batch_size % count:
        raise DataError(f"data.batch_size: {config.batch_size} rows cannot be split over "
                        f"{count} hosts; use a multiple of {count}")


Gather = Callable[[np.ndarray], np.ndarray]  # this host's int64 [k] -> every host's [hosts, k]


def _counts(splits: list[DocIndex | None], config: DataConfig,
            tokenizer: TokenizerLike, count: int) -> list[int]:
    """This host's [batches, documents, labelled tokens] of each split (0s for a missing one)."""
    local = dataclasses.replace(config, batch_size=config.batch_size // count)
    out = []
    for docs in splits:
        if docs is None or not len(docs.length):
            out += [0, 0, 0]
        else:
            rows = Dataset(docs, tokenizer, local, "", min_batches=1).stats.sequences
            out += [-(-rows // local.batch_size), len(docs.length), int(docs.targets.sum())]
    return out


def load_datasets(
    config: DataConfig, tokenizer: TokenizerLike, *, max_positions: int | None = None,
    shard: tuple[int, int] = (0, 1), gather: Gather | None = None,
) -> Datasets:
    """Index the corpus (one streamed tokenization pass) and split it by document.

    With `validation_sources`, those files form the validation split and are removed from the
    training files; otherwise `validation_fraction` of the documents (at least one) is held out
    by a seeded draw. `max_positions` (the model's context) is checked against `seq_len`.
    `shard` = (index, count): this host's part of both splits in a run of `count` hosts, which
    this host alone reads and tokenizes (see "Hosts" in the `jaxlora.data` docstring); (0, 1),
    the default, is the whole corpus. With count > 1, `gather` shares a few counts between
    the hosts (every host's int64 vector, stacked: e.g. JAX's
    `multihost_utils.process_allgather`), so that all of them step, evaluate and fail alike;
    `host_datasets` builds every host's part in one process.
    """
    if not config.sources:
        raise DataError("data.sources: no sources given")
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard}: expected (index, count) with 0 <= index < count")
    if count > 1 and gather is None:
        raise ValueError("load_datasets: a shard of several hosts needs `gather`")
    _check_hosts(config, count)
    if max_positions is not None:
        check_seq_len(config.seq_len, max_positions)
    train, val = _split_docs(config, tokenizer, shard)
    if count == 1:
        return Datasets(Dataset(train, tokenizer, config, "training"),
                        None if val is None else Dataset(val, tokenizer, config, "validation"))
    counts = np.asarray(_counts([train, val], config, tokenizer, count), np.int64)
    return _host_part(train, val, np.asarray(gather(counts)), tokenizer, config, count)


def _host_part(train: DocIndex, val: DocIndex | None, counts: np.ndarray,
               tokenizer: TokenizerLike, config: DataConfig, count: int) -> Datasets:
    """One host's `Datasets` from its documents and every host's `_counts` ([hosts, 6])."""
    most, total = counts.max(0), counts.sum(0)
    local = dataclasses.replace(config, batch_size=config.batch_size // count)
    out = []
    for k, (docs, name) in enumerate(((train, "training"), (val, "validation"))):
        if docs is None:
            out.append(None)
            continue
        _check_split(name, docs, int(total[3 * k + 1]), int(total[3 * k + 2]))
        out.append(Dataset(docs, tokenizer, local, name, min_batches=max(int(most[3 * k]), 1)))
    return Datasets(*out)


def host_datasets(config: DataConfig, tokenizer: TokenizerLike, count: int) -> list[Datasets]:
    """Every host's `load_datasets` part of a `count`-host run, built in this one process
    (for tests and references: each host's part is indexed as that host would index it)."""
    _check_hosts(config, count)
    splits = [_split_docs(config, tokenizer, (p, count)) for p in range(count)]
    counts = np.asarray([_counts(list(s), config, tokenizer, count) for s in splits], np.int64)
    return [_host_part(*s, counts, tokenizer, config, count) for s in splits]
