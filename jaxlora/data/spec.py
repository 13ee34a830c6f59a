"""What the data pipeline takes and gives: its config, the tokenizer it needs, batches, state.

`DataConfig` is the ``[data]`` table; `Batch` is one packed batch; `IteratorState` is where a
training iterator stands (saved in checkpoints). The layout these describe is in the
`jaxlora.data` docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from jaxlora import schema
from jaxlora.errors import DataError

__all__ = [
    "Batch",
    "DataConfig",
    "IteratorState",
    "TokenizerLike",
    "check_seq_len",
]


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


def check_seq_len(seq_len: int, max_positions: int) -> None:
    """Raise DataError when rows are longer than the model's context."""
    if seq_len > max_positions:
        raise DataError(
            f"data.seq_len = {seq_len} exceeds the model's context of {max_positions} positions"
        )

