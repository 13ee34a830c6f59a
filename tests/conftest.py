"""Shared test fixtures: a persistent XLA compilation cache and tiny run configs.

The compilation cache makes identical programs (the tiny model's train/eval/generate steps,
built again by each `train.run`) compile once per machine instead of once per run; it never
changes results. Set JAXLORA_TEST_JAX_CACHE to choose its folder ("" disables it).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import lora, models

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


def random_params(cfg: models.ModelConfig, seed: int = 0, kernel_gain: float = 1.0) -> dict:
    """The init_params structure with O(1) activations, so that tests discriminate.

    Kernels N(0, (gain^2)/in), embeddings N(0, 1), norm scales 1 + N(0, 0.1), biases N(0, 0.1).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    out = {}
    for path, leaf in lora.flatten_paths(shapes).items():
        shape = leaf.shape
        if path.endswith("kernel"):
            x = kernel_gain * rng.standard_normal(shape) / math.sqrt(shape[-2])
        elif path.endswith("embedding"):
            x = rng.standard_normal(shape)
        elif path.endswith("scale"):
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            x = 0.1 * rng.standard_normal(shape)
        out[path] = jnp.asarray(x, jnp.float32)
    return lora.unflatten_paths(out)


def random_adapters(base: dict, spec: lora.LoraSpec, seed: int = 1, std: float = 1.0) -> dict:
    """Adapters shaped by `spec` with non-zero A and B (B = 0 would hide transposes); DoRA
    (`spec.method`) magnitudes near 1."""
    rng = np.random.default_rng(seed)
    flat = lora.flatten_paths(base)
    out = {}
    for p in lora.resolve_targets(base, spec):
        lead, d_in, d_out, r, scale = lora.leaf_geometry(p, tuple(flat[p].shape), spec)
        a = std * rng.standard_normal((*lead, d_in, r), np.float32)
        b = std * rng.standard_normal((*lead, r, *d_out), np.float32)
        m = None
        if spec.method == "dora":
            m = jnp.asarray(1.0 + 0.1 * rng.standard_normal((*lead, *d_out), np.float32))
        out[p] = lora.LoraPair(jnp.asarray(a), jnp.asarray(b), scale, float(spec.dropout), m=m)
    return lora.unflatten_paths(out)
