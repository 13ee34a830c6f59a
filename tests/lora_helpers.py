"""Shared test data for the tests of jaxlora.lora (tests/test_lora_*.py)."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

L, D, F, V = 2, 64, 128, 50
QV = ("q_proj", "v_proj")  # LoraSpec's targets default before it became "all-linear"


def rnd(seed, shape):
    """Standard-normal float32 test data from numpy (no per-shape JAX RNG compiles)."""
    rng = np.random.default_rng(zlib.crc32(str(seed).encode()))
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def tiny_base(seed=0, dtype=np.float32):
    """A tiny Llama-layout tree (stacked layers, embeddings, lm_head); numpy RNG keeps the
    test data free of per-shape JAX compiles."""
    rng = np.random.default_rng(seed)
    n = lambda shape: jnp.asarray(rng.standard_normal(shape) / math.sqrt(shape[-2]), dtype)
    return {
        "embed": {"embedding": jnp.asarray(rng.standard_normal((V, D)), dtype)},
        "layers": {
            "attn": {
                "q_proj": {"kernel": n((L, D, D))},
                "v_proj": {"kernel": n((L, D, D)), "bias": jnp.zeros((L, D), dtype)},
                "o_proj": {"kernel": n((L, D, D))},
            },
            "mlp": {"up_proj": {"kernel": n((L, D, F))}, "down_proj": {"kernel": n((L, F, D))}},
            "attn_norm": {"scale": jnp.ones((L, D), dtype)},
        },
        "final_norm": {"scale": jnp.ones((D,), dtype)},
        "lm_head": {"kernel": n((D, V))},
    }


def randomize(adapters, seed=1, std=0.1):
    """Non-zero A and B so the LoRA term matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), adapters
    )


def f64(x):
    return np.asarray(x, np.float64)


def relerr(x, ref):
    return float(np.max(np.abs(f64(x) - ref)) / np.max(np.abs(ref)))
