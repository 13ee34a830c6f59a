"""Hugging Face folders: save_hf -> load_model round trips, shards, safetensors compatibility."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_helpers import flat, random_params, tiny_gpt2, tiny_llama, tiny_tokenizer_meta, write_gguf  # noqa: E402

from jaxlora.errors import ModelLoadError  # noqa: E402
from jaxlora.io import load_model, save_hf  # noqa: E402
from jaxlora.io.hf import config_from_hf, read_safetensors, write_safetensors  # noqa: E402
from jaxlora.io.tokenizer import Tokenizer  # noqa: E402

CFGS = {
    "llama-gqa-tied": tiny_llama(),
    "llama-untied": tiny_llama(tie_embeddings=False),
    "qwen2-bias": tiny_llama(attention_bias=True),
    "gpt2": tiny_gpt2(),
}


def tokenizer():
    return Tokenizer.from_gguf_metadata(tiny_tokenizer_meta())


def assert_tree_equal(got, want):
    g, w = flat(got), flat(want)
    assert sorted(g) == sorted(w)
    for k in w:
        np.testing.assert_array_equal(
            np.asarray(g[k], np.float32), np.asarray(w[k], np.float32), err_msg=k
        )


@pytest.mark.parametrize("name", list(CFGS))
def test_save_load_round_trip(tmp_path, name):
    cfg = CFGS[name]
    params = random_params(cfg, seed=5)
    save_hf(tmp_path, cfg, params, tokenizer=tokenizer())
    assert {p.name for p in tmp_path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    m = load_model(tmp_path)
    assert m.config == cfg
    assert_tree_equal(m.params, params)
    assert m.tokenizer.encode(" the 1 <|im_end|>") == tokenizer().encode(" the 1 <|im_end|>")
    assert m.tokenizer.chat_template == tokenizer().chat_template
    assert (m.tokenizer.bos_id, m.tokenizer.eos_id, m.tokenizer.pad_id) == (0, 2, 0)


def test_hf_names_and_layouts(tmp_path):
    """The file uses transformers' names and torch layouts (Linear [out, in], GPT-2 Conv1D [in, out])."""
    cfg = tiny_llama(tie_embeddings=False)
    params = random_params(cfg)
    save_hf(tmp_path / "l", cfg, params)
    st = read_safetensors(tmp_path / "l" / "model.safetensors")
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(st["model.layers.1.self_attn.q_proj.weight"], q[1].T)
    np.testing.assert_array_equal(st["lm_head.weight"], params["lm_head"]["kernel"].T)
    assert st["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert len(st) == 2 + 1 + 9 * 2
    g = tiny_gpt2()
    gp = random_params(g)
    save_hf(tmp_path / "g", g, gp)
    st = read_safetensors(tmp_path / "g" / "model.safetensors")
    np.testing.assert_array_equal(
        st["transformer.h.1.attn.c_attn.weight"], gp["layers"]["attn"]["c_attn"]["kernel"][1]
    )
    assert st["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)
    hf = json.loads((tmp_path / "g" / "config.json").read_text())
    assert hf["architectures"] == ["GPT2LMHeadModel"] and hf["n_inner"] == 256


def test_gpt2_checkpoint_without_prefix_and_with_buffers(tmp_path):
    """The hub's gpt2 stores names without 'transformer.' and carries attn.bias buffers."""
    cfg = tiny_gpt2()
    params = random_params(cfg)
    save_hf(tmp_path, cfg, params, tokenizer=tokenizer())
    st = {
        k.removeprefix("transformer."): np.array(v)
        for k, v in read_safetensors(tmp_path / "model.safetensors").items()
    }
    st["h.0.attn.bias"] = np.ones((1, 1, 8, 8), np.float32)
    st["lm_head.weight"] = st["wte.weight"].copy()
    write_safetensors(tmp_path / "model.safetensors", st)
    assert_tree_equal(load_model(tmp_path).params, params)


def test_bfloat16_save_and_load(tmp_path):
    cfg = tiny_llama()
    params = random_params(cfg)
    save_hf(tmp_path, cfg, params, tokenizer=tokenizer(), dtype="bfloat16")
    st = read_safetensors(tmp_path / "model.safetensors")
    assert st["model.embed_tokens.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m = load_model(tmp_path, dtype=jnp.bfloat16)
    want = jnp.asarray(params["layers"]["mlp"]["gate_proj"]["kernel"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(m.params["layers"]["mlp"]["gate_proj"]["kernel"]), np.asarray(want)
    )
    m32 = load_model(tmp_path)  # bf16 file -> float32 exactly the bf16 values
    np.testing.assert_array_equal(
        np.asarray(m32.params["layers"]["mlp"]["gate_proj"]["kernel"]), np.asarray(want, np.float32)
    )


def test_sharded_with_index(tmp_path):
    cfg = tiny_llama(tie_embeddings=False)
    params = random_params(cfg, seed=7)
    save_hf(tmp_path / "one", cfg, params, tokenizer=tokenizer())
    st = {
        k: np.array(v) for k, v in read_safetensors(tmp_path / "one" / "model.safetensors").items()
    }
    names = sorted(st)
    shards = {
        "model-00001-of-00003.safetensors": names[0::3],
        "model-00002-of-00003.safetensors": names[1::3],
        "model-00003-of-00003.safetensors": names[2::3],
    }
    out = tmp_path / "sharded"
    out.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tmp_path / "one" / f).read_bytes())
    for fname, keys in shards.items():
        write_safetensors(out / fname, {k: st[k] for k in keys})
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert_tree_equal(load_model(out).params, params)
    (out / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        ModelLoadError,
        match=r"model\.safetensors\.index\.json: shard model-00002-of-00003\.safetensors is missing",
    ):
        load_model(out)


def test_safetensors_interop(tmp_path):
    """Our writer's files open with the safetensors package, and we read its files."""
    from safetensors.numpy import load_file, save_file

    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones(5, np.float16),
        "c": np.zeros((0, 2), np.float32),
    }
    write_safetensors(tmp_path / "mine.safetensors", arrays, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "mine.safetensors"))
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
        assert back[k].dtype == arrays[k].dtype
    save_file(arrays, str(tmp_path / "theirs.safetensors"))
    mine = read_safetensors(tmp_path / "theirs.safetensors")
    for k in arrays:
        np.testing.assert_array_equal(mine[k], arrays[k])


def test_gguf_to_hf_to_load(tmp_path):
    """GGUF -> load -> save_hf -> load: the same parameters and tokenizer ids."""
    cfg = tiny_llama()
    params = random_params(cfg, seed=8)
    write_gguf(tmp_path / "m.gguf", cfg, params)
    a = load_model(tmp_path / "m.gguf")
    save_hf(tmp_path / "hf", a.config, a.params, tokenizer=a.tokenizer)
    b = load_model(tmp_path / "hf")
    assert b.config == a.config
    assert_tree_equal(b.params, params)
    text = "Hello  world\n\t123 <|im_start|>user"
    assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert b.tokenizer.apply_chat_template(msgs) == a.tokenizer.apply_chat_template(msgs)


def test_config_mapping_variants():
    base = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "rms_norm_eps": 1e-6,
        "eos_token_id": [7, 8],
        "bos_token_id": 1,
    }
    cfg, kind = config_from_hf(base)
    assert (
        kind == "llama" and cfg.eos_token_id == 7 and cfg.head_dim == 16 and not cfg.tie_embeddings
    )
    assert cfg.rope_theta == 10000.0
    v5 = dict(base, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert (
        config_from_hf(v5)[0].rope_theta == 500000.0 and config_from_hf(v5)[0].rope_scaling is None
    )
    l3 = dict(
        base,
        rope_theta=5e5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert config_from_hf(l3)[0].rope_scaling_dict == l3["rope_scaling"]
    with pytest.raises(ModelLoadError, match="rope_scaling type 'yarn' is not supported"):
        config_from_hf(dict(base, rope_scaling={"type": "yarn", "factor": 4.0}))
    q, kind = config_from_hf(dict(base, architectures=["Qwen2ForCausalLM"]))
    assert kind == "qwen2" and q.attention_bias
    assert config_from_hf(dict(base, architectures=["MistralForCausalLM"]))[1] == "mistral"


# --- bad input ----------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    cfg = tiny_llama()
    save_hf(tmp_path / "m", cfg, random_params(cfg), tokenizer=tokenizer())
    return tmp_path / "m"


def _err(path, match):
    with pytest.raises(ModelLoadError, match=match) as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_unsupported_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    _err(folder, r"config\.json: architecture \['FalconForCausalLM'\] is not supported")


def test_missing_config_key(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["intermediate_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    _err(folder, r"config\.json: missing key 'intermediate_size'")


def test_config_shape_mismatch(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    _err(
        folder,
        re.escape(
            "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [64, 128], config implies [64, 96]"
        ),
    )


@pytest.mark.parametrize("keep", [4, 100, 0.99])
def test_truncated_safetensors(folder, keep):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    _err(folder, r"model\.safetensors.*(truncated|corrupt)")


def test_corrupt_header(folder):
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    f.write_bytes(bytes(data))
    _err(folder, r"model\.safetensors: not a readable safetensors file")


def test_missing_tensor(folder):
    f = folder / "model.safetensors"
    st = {
        k: np.array(v)
        for k, v in read_safetensors(f).items()
        if k != "model.layers.1.self_attn.k_proj.weight"
    }
    write_safetensors(f, st)
    _err(folder, r"missing tensors: layers/attn/k_proj/kernel \(layers \[1\]\)")


def test_unexpected_tensor(folder):
    f = folder / "model.safetensors"
    st = {k: np.array(v) for k, v in read_safetensors(f).items()}
    write_safetensors(f, {**st, "model.layers.0.self_attn.z_norm.weight": np.ones(16, np.float32)})
    _err(
        folder,
        r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.z_norm\.weight' for llama",
    )
    # a Qwen3 tensor in a Llama checkpoint: named, with the path no Llama config has
    write_safetensors(f, {**st, "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    _err(folder, r"m: tensor 'model\.layers\.0\.self_attn\.q_norm\.weight' "
                 r"\(layers/attn/q_norm/scale\) is not used by this config \(llama\)")


def test_no_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    _err(folder, r"m: no tokenizer\.json")


def test_no_weights_and_no_config(tmp_path, folder):
    (folder / "model.safetensors").unlink()
    _err(folder, r"no \*\.safetensors weights")
    (tmp_path / "empty").mkdir()
    _err(tmp_path / "empty", r"empty: folder has no config\.json")


def test_save_hf_rejects_unknown_leaf(tmp_path):
    cfg = tiny_llama()
    params = random_params(cfg)
    params["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"no Hugging Face name: \['extra/kernel'\]"):
        save_hf(tmp_path, cfg, params)


def test_save_hf_dequantizes_qtensors(tmp_path):
    quant = pytest.importorskip("jaxlora.quant")
    cfg = tiny_llama()
    params = random_params(cfg)
    qparams = dict(params, layers=dict(params["layers"], attn=dict(params["layers"]["attn"])))
    qk = jax.jit(lambda x: quant.quantize(x, "nf4", 64, True, batch_dims=1))(
        params["layers"]["attn"]["q_proj"]["kernel"]
    )
    qparams["layers"]["attn"]["q_proj"] = {"kernel": qk}
    save_hf(tmp_path, cfg, qparams, tokenizer=tokenizer())
    got = load_model(tmp_path).params["layers"]["attn"]["q_proj"]["kernel"]
    want = quant.dequantize(qparams["layers"]["attn"]["q_proj"]["kernel"], jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_iter_safetensors_reads_each_tensor_into_its_own_buffer(tmp_path):
    from jaxlora.io.hf import iter_safetensors

    f = tmp_path / "t.safetensors"
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    write_safetensors(f, tensors)
    got = {}
    for name, read in iter_safetensors(f):
        arr = read()
        assert not isinstance(arr, np.memmap) and arr.flags.owndata  # no view of a map
        got[name] = arr
    assert got.keys() == tensors.keys()
    for name, arr in tensors.items():
        np.testing.assert_array_equal(got[name], arr)
        np.testing.assert_array_equal(got[name], read_safetensors(f)[name])
    data = f.read_bytes()
    f.write_bytes(data[:-4])  # cut into b's bytes
    with pytest.raises(ModelLoadError, match=r"t\.safetensors: tensor 'b'"):
        for _, read in iter_safetensors(f):
            read()
