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

Hosts (multi-host runs)
    Each host reads, tokenizes and batches its own part of the corpus only:
    `load_datasets(..., shard=(p, P), gather=...)`. The files of a split (in sorted order, the
    same on every host) are one byte stream cut into ``P`` equal ranges; host ``p`` owns the
    JSONL lines that start in its range and the plain-text files whose first byte lies in it
    (`documents.host_ranges`), so it opens only the files its range touches and reads only
    the sizes of the others. A `validation_fraction` is drawn per document from a seeded hash
    of its file and byte offset, so each host holds out its own documents (at least one, and
    keeps at least one, where it has two); `max_documents` caps each host at its share.
    Batches have ``batch_size / P`` rows (``batch_size`` must divide). `gather` (JAX's
    ``process_allgather`` in a run) shares each host's batch, document and labelled-token
    counts, so every host has as many batches per epoch as the fullest one (the others' last
    batches are padding rows, and a host may hold no documents at all), all hosts step,
    evaluate and resume at the same ``IteratorState``, and an empty split fails on every host
    alike. The global batch is the hosts' rows concatenated in process order
    (`jaxlora.sharding.put_batch`); `host_datasets` builds every host's part in one process.
    Where a host's part starts inside a JSONL file its messages name a line by its byte
    offset (counting the lines before it would read them). ``shard=(0, 1)`` is the
    single-host behaviour, bit for bit.

Errors are `jaxlora.errors.DataError` with one line naming the file (and line).
"""

from jaxlora.data.dataset import (
    DataIterator,
    Dataset,
    Datasets,
    DataStats,
    host_datasets,
    load_datasets,
)
from jaxlora.data.sources import resolve_sources
from jaxlora.data.spec import Batch, DataConfig, IteratorState, TokenizerLike, check_seq_len

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
    "host_datasets",
    "load_datasets",
    "resolve_sources",
]
