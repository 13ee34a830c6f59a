"""Shared test fixtures: a persistent XLA compilation cache and tiny run configs.

The compilation cache makes identical programs (the tiny model's train/eval/generate steps,
built again by each `train.run`) compile once per machine instead of once per run; it never
changes results. Set JAXLORA_TEST_JAX_CACHE to choose its folder ("" disables it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import pytest

_CACHE = os.environ.get(
    "JAXLORA_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"jaxlora-test-xla-{os.getuid()}")
)
if _CACHE:
    os.environ.setdefault("JAXLORA_TEST_JAX_CACHE", _CACHE)  # subprocesses reuse it
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

TRAIN_TEXT = "the quick brown fox jumps over the lazy dog. " * 12
VAL_TEXT = "a lazy dog sleeps under the quick brown fox. " * 4


def write_tiny_config(
    folder: Path,
    name: str = "tiny",
    *,
    steps: int = 4,
    model: str = "tiny-llama",
    qtype: str = "nf4",
) -> Path:
    """A tiny-model run config (and its corpus) in `folder` (vary it with overrides).

    Runs of configs that differ only in name/output_dir/seeds compile the same programs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(TRAIN_TEXT)
    (folder / "val.txt").write_text(VAL_TEXT)
    path = folder / f"{name}.toml"
    path.write_text(f"""\
name = "{name}"
output_dir = "{folder / "runs"}"
[model]
name = "{model}"
[quant]
qtype = "{qtype}"
[lora]
rank = 4
[data]
sources = ["{folder / "train.txt"}"]
validation_sources = ["{folder / "val.txt"}"]
seq_len = 32
batch_size = 2
shuffle = false
[optim]
lr = 0.01
schedule = "constant"
[train]
steps = {steps}
log_every = 2
progress = false
[eval]
every = 2
batches = 2
samples = ["the"]
max_new_tokens = 4
[checkpoint]
every = 2
async_save = false
""")
    return path


@pytest.fixture
def tiny_config(tmp_path: Path):
    """`tiny_config(name="tiny", steps=4, ...)` -> path of a tiny run config in tmp_path."""

    def make(name: str = "tiny", **kw) -> Path:
        return write_tiny_config(tmp_path, name, **kw)

    return make
