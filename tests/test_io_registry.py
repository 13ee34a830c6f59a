"""The model registry's random test models: `tiny-llama` / `tiny-gpt2` load like any name."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxlora import models, quant
from jaxlora.errors import ModelLoadError
from jaxlora.io import RANDOM_MODELS, load_model, resolve
from jaxlora.models import ModelConfig
from jaxlora.paths import flatten_paths

PRESETS = {"tiny-llama": ModelConfig.tiny_llama, "tiny-gpt2": ModelConfig.tiny_gpt2}


@pytest.mark.parametrize(
    "name,qtype,dtype,seed",
    [
        ("tiny-llama", "nf4", "float32", 0),
        ("tiny-gpt2", "int8", "bfloat16", 5),
        ("tiny-llama", "none", "bfloat16", 2),
        ("tiny-gpt2", "fp4", "float32", 1),
    ],
)
def test_random_model_equals_init_params_then_quantize_tree(name, qtype, dtype, seed):
    """Quantized on load (per tensor), bit for bit what `init_params` + `quantize_tree` give."""
    rules = quant.QuantRules(qtype=qtype)
    m = load_model(name, quant=None if qtype == "none" else rules, dtype=dtype, seed=seed)
    vocab = m.tokenizer.vocab_size
    want_cfg = PRESETS[name](vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                             max_position_embeddings=512)
    assert m.config == want_cfg and m.source == name
    want, _ = quant.quantize_tree(models.init_params(want_cfg, jax.random.key(seed), dtype=dtype),
                                  rules)
    got_flat, want_flat = flatten_paths(m.params), flatten_paths(want)
    assert list(got_flat) == list(want_flat)  # same paths, same order
    assert jax.tree.structure(m.params) == jax.tree.structure(want)
    for path in want_flat:
        g, w = jax.tree.leaves(got_flat[path]), jax.tree.leaves(want_flat[path])
        assert [x.dtype for x in g] == [x.dtype for x in w], path
        for x, y in zip(g, w, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


def test_random_model_seed_tokenizer_and_hook():
    a = load_model("tiny-llama", seed=0)
    b = load_model("tiny-llama", seed=1)
    assert not np.array_equal(np.asarray(a.params["embed"]["embedding"]),
                              np.asarray(b.params["embed"]["embedding"]))
    tok = a.tokenizer
    assert tok.decode(tok.encode("hello")) == "hello"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat == "<s>user\nhi</s>\n<s>assistant\n"
    seen = []

    def hook(path, arr, layer):  # a quant hook sees every tensor, per layer under layers/
        seen.append((path, layer, arr.dtype))

    load_model("tiny-gpt2", quant=hook)
    shapes = models.param_shapes(load_model("tiny-gpt2").config)
    assert {p for p, _, _ in seen} == set(shapes)
    assert all(d == np.float32 for _, _, d in seen)
    assert sorted(i for p, i, _ in seen if p == "layers/attn/c_attn/kernel") == [0, 1]


def test_random_names_are_registered_and_have_no_file():
    assert set(RANDOM_MODELS) == {"tiny-llama", "tiny-gpt2"}
    with pytest.raises(ModelLoadError, match="random test model with no file"):
        resolve("tiny-llama")
