"""jaxlora.io.peft: PEFT folder round trip, key names, config fields and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_adapters
from safetensors.numpy import load_file, save_file

from jaxlora import lora
from jaxlora.errors import CheckpointError
from jaxlora.io import Tokenizer
from jaxlora.io.peft import load_peft, save_peft
from jaxlora.models import ModelConfig, init_params  # noqa: F401 (eval_shape only)

LLAMA = ModelConfig.tiny_llama()
GPT2 = ModelConfig.tiny_gpt2()


def _shapes(cfg):
    """The base tree as ShapeDtypeStructs: PEFT loading only reads shapes (and it is fast)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def _assert_same(x, y):
    fx, fy = lora.flatten_paths(x), lora.flatten_paths(y)
    assert sorted(fx) == sorted(fy)
    for p in fx:
        assert fx[p].scale == pytest.approx(fy[p].scale, rel=1e-12), p
        assert fx[p].dropout == fy[p].dropout
        assert (fx[p].m is None) == (fy[p].m is None), p
        pairs = ((fx[p].a, fy[p].a), (fx[p].b, fy[p].b))
        for u, v in pairs + (((fx[p].m, fy[p].m),) if fx[p].m is not None else ()):
            assert u.dtype == v.dtype and u.shape == v.shape
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_llama_round_trip_bit_exact(tmp_path: Path, scaling: str) -> None:
    base = _shapes(LLAMA)
    spec = lora.LoraSpec(
        rank=4,
        alpha=8,
        scaling=scaling,
        targets="all-linear",
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3.0},
        dropout=0.05,
    )
    ad = random_adapters(base, spec)
    save_peft(tmp_path, ad, spec, base_model_name="tiny", arch="llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] == (scaling == "rslora")
    assert cfg["rank_pattern"] == {"down_proj": 2}
    assert cfg["alpha_pattern"] == {"v_proj": 3}
    assert cfg["lora_dropout"] == 0.05 and cfg["base_model_name_or_path"] == "tiny"
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(t) == 2 * 7 * LLAMA.num_layers
    qa = t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    qb = t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    q = ad["layers"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(qa, np.asarray(q.a[1]).T)  # (r, in)
    np.testing.assert_array_equal(qb, np.asarray(q.b[1]).T)  # (out, r)
    assert t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (
        2,
        LLAMA.intermediate_size,
    )
    back = load_peft(tmp_path, base, "llama")
    _assert_same(back, ad)


def test_gpt2_round_trip_and_names(tmp_path: Path) -> None:
    base = _shapes(GPT2)
    spec = lora.LoraSpec(rank=4, alpha=16, targets=r"^layers/.*/(c_attn|c_proj|c_fc)/kernel$")
    ad = random_adapters(base, spec)
    save_peft(tmp_path, ad, spec, "gpt2", arch=GPT2)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert sorted(cfg["target_modules"]) == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    d = GPT2.hidden_size
    assert t["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, d)
    assert t["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].shape == (3 * d, 4)
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in t
    _assert_same(load_peft(tmp_path, base, GPT2), ad)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_dora_round_trip_bit_exact(tmp_path: Path, cfg) -> None:
    base = _shapes(cfg)
    spec = lora.LoraSpec(rank=4, alpha=8, targets="all-linear", method="dora")
    ad = random_adapters(base, spec)
    save_peft(tmp_path, ad, spec, "tiny", arch=cfg)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    mags = {k: v for k, v in t.items() if k.endswith(".lora_magnitude_vector")}
    assert len(mags) == len(t) // 3
    if cfg is LLAMA:
        q = ad["layers"]["attn"]["q_proj"]["kernel"]
        np.testing.assert_array_equal(
            t["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"],
            np.asarray(q.m[1]))  # (out,)
    _assert_same(load_peft(tmp_path, base, cfg), ad)
    # PEFT's in-memory spelling (adapter name and the DoraLinearLayer's .weight) reads the same
    renamed = {k.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight"): v
               for k, v in t.items()}
    save_file(renamed, str(tmp_path / "adapter_model.safetensors"))
    _assert_same(load_peft(tmp_path, base, cfg), ad)


def test_dora_magnitudes_must_match_the_config(tmp_path: Path) -> None:
    base = _shapes(LLAMA)
    spec = lora.LoraSpec(rank=2, targets=("q_proj",), method="dora")
    save_peft(tmp_path, random_adapters(base, spec), spec, "tiny", "llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(CheckpointError, match="lora_magnitude_vector but the adapter config has no use_dora"):
        load_peft(tmp_path, base, "llama")
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file({**t, key: t[key][:-1]}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"q_proj\.lora_magnitude_vector has shape \(63,\)"):
        load_peft(tmp_path, base, "llama")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_forward_unchanged_by_round_trip(tmp_path: Path, method: str) -> None:
    rng = np.random.default_rng(0)
    base = jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape, np.float32)), _shapes(LLAMA)
    )
    spec = lora.LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"), method=method)
    ad = random_adapters(base, spec)
    save_peft(tmp_path, ad, spec, "tiny", "llama")
    from jaxlora.models import forward

    fwd = jax.jit(lambda p, t, a: forward(LLAMA, p, t, adapters=a))
    tokens = jnp.arange(12).reshape(2, 6) % LLAMA.vocab_size
    ref = fwd(base, tokens, ad)
    got = fwd(base, tokens, load_peft(tmp_path, base, "llama"))
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(got))
    zero = jax.tree.map(jnp.zeros_like, ad)
    assert not np.allclose(np.asarray(ref), np.asarray(fwd(base, tokens, zero)))


@pytest.fixture
def saved(tmp_path: Path):
    base = _shapes(LLAMA)
    spec = lora.LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    save_peft(tmp_path, random_adapters(base, spec), spec, "tiny", "llama")
    return tmp_path, base


def _edit(folder: Path, fn) -> None:
    path = folder / "adapter_model.safetensors"
    t = dict(load_file(str(path)))
    fn(t)
    save_file(t, str(path))


def test_missing_key_is_named(saved) -> None:
    folder, base = saved
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _edit(folder, lambda t: t.pop(key))
    with pytest.raises(
        CheckpointError, match=r"missing keys: .*layers\.1\.self_attn\.v_proj\.lora_B"
    ):
        load_peft(folder, base, "llama")


def test_missing_target_module(saved) -> None:
    folder, base = saved
    _edit(folder, lambda t: [t.pop(k) for k in list(t) if "v_proj" in k])
    with pytest.raises(CheckpointError, match="missing keys for target module 'v_proj'"):
        load_peft(folder, base, "llama")


def test_other_architecture(saved) -> None:
    folder, base = saved
    gbase = _shapes(GPT2)
    with pytest.raises(CheckpointError, match="do not map to a gpt2 model"):
        load_peft(folder, gbase, "gpt2")


def test_shape_mismatch_named(saved) -> None:
    folder, _ = saved
    wide = _shapes(ModelConfig.tiny_llama(hidden_size=96))
    with pytest.raises(
        CheckpointError,
        match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 64\), expected \(4, 96\)",
    ):
        load_peft(folder, wide, "llama")
    deeper = _shapes(ModelConfig.tiny_llama(num_layers=3))
    with pytest.raises(CheckpointError, match=r"missing keys: .*layers\.2\."):
        load_peft(folder, deeper, "llama")


def test_unsupported_options_and_save_errors(saved, tmp_path: Path) -> None:
    folder, base = saved
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_dora"] = True  # but no magnitudes saved
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys: .*q_proj\.lora_magnitude_vector"):
        load_peft(folder, base, "llama")
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False, "bias": "all"}))
    with pytest.raises(CheckpointError, match="bias='all' is not supported"):
        load_peft(folder, base, "llama")
    with pytest.raises(CheckpointError, match="not found"):
        load_peft(tmp_path / "nope", base, "llama")
    emb = random_adapters(base, lora.LoraSpec(targets=r"^embed/embedding$"))
    with pytest.raises(CheckpointError, match="no PEFT module name"):
        save_peft(tmp_path / "e", emb, None, "tiny", "llama")


# --------------------------------------------------------------------------------------------
# jaxlora.export: merged export and the export() entry (kept here: both are export formats)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_model():
    """A tiny Llama with an NF4 base and random non-zero adapters on all linear layers."""
    from jaxlora import quant

    tok = Tokenizer.byte_level()
    vocab = tok.vocab_size
    cfg = ModelConfig.tiny_llama(vocab_size=vocab)
    rng = np.random.default_rng(0)
    base = jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape, np.float32)), _shapes(cfg)
    )
    # jitted: one compile instead of one per eager op
    qbase = jax.jit(lambda b: quant.quantize_tree(b, quant.QuantRules(qtype="nf4"))[0])(base)
    assert isinstance(qbase["layers"]["attn"]["q_proj"]["kernel"], quant.QTensor)
    spec = lora.LoraSpec(rank=4, alpha=8, targets="all-linear")
    ad = jax.tree.map(lambda x: 0.1 * x, random_adapters(base, spec))
    return cfg, qbase, ad, tok, spec


def test_merged_export_equals_unmerged_qlora(tmp_path: Path, qlora_model) -> None:
    from jaxlora.export import export_merged
    from jaxlora.io import load_model
    from jaxlora.models import forward

    cfg, qbase, ad, tok, _ = qlora_model
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8)))
    ref = jax.jit(lambda p, t, a: forward(cfg, p, t, adapters=a))(qbase, tokens, ad)
    out = export_merged(tmp_path / "merged", cfg, qbase, ad, tok, dtype="float32")
    loaded = load_model(out)
    assert not any(isinstance(x, lora.LoraWeight) for x in jax.tree.leaves(loaded.params))
    got = jax.jit(lambda p, t: forward(loaded.config, p, t))(loaded.params, tokens)
    ref, got = np.asarray(ref), np.asarray(got)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the adapters matter: the plain quantized base is far from it
    base_only = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t))(qbase, tokens))
    assert np.abs(base_only - ref).max() > 100 * np.abs(got - ref).max()
    # bfloat16 storage: same model up to bf16 rounding of the weights
    export_merged(tmp_path / "bf16", cfg, qbase, ad, tok, dtype="bfloat16")
    st = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype.itemsize == 2 for v in st.values())


def test_export_refuses_to_overwrite_and_is_atomic(tmp_path: Path, qlora_model) -> None:
    from jaxlora.export import RunPieces, atomic_dir, export, export_merged

    cfg, qbase, ad, tok, spec = qlora_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        export_merged(out, cfg, qbase, ad, tok)
    pieces = RunPieces(cfg, qbase, ad, tok, spec, "tiny-llama", 3)
    for fmt in ("peft", "merged"):
        with pytest.raises(CheckpointError, match="refusing to overwrite"):
            export(None, fmt, out, pieces=pieces)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(CheckpointError, match="unknown format"):
        export(None, "gguf", tmp_path / "x", pieces=pieces)
    with pytest.raises(CheckpointError, match="not a run directory"):
        export(tmp_path / "no_run", "peft", tmp_path / "y")
    # a failure half-way leaves neither the output nor a temporary folder behind
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "z") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # an existing empty folder is fine; PEFT export through the entry point loads back
    (tmp_path / "peft").mkdir()
    export(None, "peft", tmp_path / "peft", pieces=pieces)
    from jaxlora.io.peft import load_peft

    _assert_same(load_peft(tmp_path / "peft", qbase, cfg), ad)
