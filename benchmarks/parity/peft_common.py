"""Shared helpers of the PEFT parity scripts (jaxlora side; run with the project venv)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import lora
from jaxlora.models import ModelConfig, init_params


def byte_tokenizer():
    """A byte-level tokenizer (3 specials + 256 bytes): load_model needs a tokenizer.json."""
    from jaxlora.io import Tokenizer

    tok = Tokenizer.byte_level()
    return tok, tok.vocab_size


def tiny_config(arch: str, vocab: int) -> ModelConfig:
    if arch == "llama":
        # untied head and q/k/v with GQA exercise more of the mapping
        return ModelConfig.tiny_llama(vocab_size=vocab, tie_embeddings=False, name="tiny-llama")
    return ModelConfig.tiny_gpt2(vocab_size=vocab, name="tiny-gpt2")


def random_base(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random weights with std 0.1 (init's 0.02 gives near-uniform logits); norms near 1."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape, np.float32))
        return jnp.asarray(0.1 * rng.standard_normal(s.shape, np.float32))

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_adapters(base: dict, spec: lora.LoraSpec, seed: int = 1) -> dict:
    """Adapters shaped by spec with non-zero A and B (std 0.1); for DoRA, magnitudes of
    ``||W + s A B||_c`` times 1 + N(0, 0.2^2), so the magnitude matters too."""
    rng = np.random.default_rng(seed)
    flat = lora.flatten_paths(base)
    out = {}
    for p in lora.resolve_targets(base, spec):
        lead, d_in, d_out, r, scale = lora.leaf_geometry(p, tuple(flat[p].shape), spec)
        a = 0.1 * rng.standard_normal((*lead, d_in, r), np.float32)
        b = 0.1 * rng.standard_normal((*lead, r, *d_out), np.float32)
        out[p] = lora.LoraPair(jnp.asarray(a), jnp.asarray(b), scale, 0.0)
    out = lora.adapters.with_magnitudes(base, out, spec)
    if spec.method == "dora":
        jitter = lambda m: m * (1 + 0.2 * rng.standard_normal(m.shape, np.float32))  # noqa: E731
        out = {p: dataclasses.replace(pair, m=jitter(pair.m)) for p, pair in out.items()}
    return lora.unflatten_paths(out)
