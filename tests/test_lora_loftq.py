"""LoftQ (Li et al. 2023, arXiv 2310.08659): the alternating algorithm against a float64
reference, the streamed load, and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lora_helpers import f64, rnd

from jaxlora import config, io, lora, quant
from jaxlora.errors import ConfigError
from jaxlora.lora import LoraSpec
from jaxlora.lora.loftq import loftq

RULES = quant.QuantRules(qtype="nf4")


def _reference(w, rank, scale, iters):
    """Algorithm 1 in float64 (quantization by `quant.quantize`, the SVD by numpy):
    ``Q_t = q(W - s A B)``, ``s A B = top-r SVD of W - Q_t``; returns (Q, s A B)."""
    low = np.zeros_like(f64(w))
    for _ in range(iters):
        q = quant.quantize(jnp.asarray(f64(w) - low, jnp.float32), "nf4")
        resid = f64(w) - f64(quant.dequantize(q))
        u, s, vh = np.linalg.svd(resid, full_matrices=False)
        low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return q, low


@pytest.mark.parametrize("iters", [1, 2, 4])
def test_loftq_is_algorithm_1(iters):
    w = rnd(0, (128, 96)) / 10
    q, a, b = loftq(w, rank=8, scale=2.0, iters=iters)
    q_ref, low_ref = _reference(w, 8, 2.0, iters)
    if iters == 1:  # the first quantization is plain NF4 of W
        np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(quant.quantize(w).codes))
    assert np.mean(np.asarray(q.codes) == np.asarray(q_ref.codes)) > 0.999  # rounding ties aside
    low = 2.0 * f64(a) @ f64(b)
    assert np.linalg.norm(low - low_ref) / np.linalg.norm(low_ref) < 1e-3
    err = np.linalg.norm(f64(w) - f64(quant.dequantize(q)) - low)
    plain = np.linalg.norm(f64(w) - f64(quant.dequantize(quant.quantize(w))))
    assert err < 0.95 * plain


def test_loftq_on_load_beats_plain_nf4_and_leaves_the_rest_alone():
    spec = LoraSpec(rank=4, targets=("q_proj", "down_proj"), init="loftq", loftq_iters=2)
    loaded, ad = lora.load_loftq("tiny-llama", RULES, spec)
    plain = lora.flatten_paths(io.load_model("tiny-llama", quant=RULES).params)
    w = lora.flatten_paths(io.load_model("tiny-llama").params)
    got = lora.flatten_paths(loaded.params)
    pairs = lora.flatten_paths(ad)
    assert sorted(pairs) == ["layers/attn/q_proj/kernel", "layers/mlp/down_proj/kernel"]
    for path, pair in pairs.items():
        approx = f64(quant.dequantize(got[path])) + pair.scale * np.einsum(
            "lir,lro->lio", f64(pair.a), f64(pair.b))
        ref = f64(w[path])
        err = np.linalg.norm(ref - approx) / np.linalg.norm(ref)
        err_plain = np.linalg.norm(ref - f64(quant.dequantize(plain[path]))) / np.linalg.norm(ref)
        assert err < 0.9 * err_plain, path
    k = "layers/attn/k_proj/kernel"  # not a target: plain NF4, bit for bit
    np.testing.assert_array_equal(np.asarray(got[k].codes), np.asarray(plain[k].codes))
    dora = lora.load_loftq("tiny-llama", RULES, LoraSpec(rank=4, targets=("q_proj",),
                                                         init="loftq", method="dora"))[1]
    assert lora.flatten_paths(dora)["layers/attn/q_proj/kernel"].m.shape == (2, 64)


def test_loftq_refusals(tmp_path):
    spec = LoraSpec(rank=4, init="loftq")
    with pytest.raises(ValueError, match="needs a quantized base"):
        lora.load_loftq("tiny-llama", quant.QuantRules(qtype="none"), spec)
    with pytest.raises(ConfigError, match="lora.init: 'loftq' initializes a quantized base"):
        config.config_from_dict({"quant": {"qtype": "none"}, "lora": {"init": "loftq"}})
    partial = quant.QuantRules(qtype="nf4", exclude=r"q_proj")
    with pytest.raises(ValueError, match="target 'layers/attn/q_proj/kernel' is not quantized"):
        lora.load_loftq("tiny-llama", partial, spec)
    with pytest.raises(ValueError, match="replaces the base weights"):
        lora.init(jax.random.key(0), io.load_model("tiny-llama").params, spec)


def test_a_run_starts_from_loftq_and_refuses_a_peft_export(tmp_path):
    from conftest import write_tiny_config

    from jaxlora import export, train
    from jaxlora.errors import CheckpointError

    cfg = config.load_config(write_tiny_config(tmp_path), {"lora.init": "loftq", "lora.rank": 2})
    s = train.setup(cfg)
    loaded, ad = lora.load_loftq("tiny-llama", cfg.quant, cfg.lora, seed=cfg.train.seed)
    path = "layers/mlp/up_proj/kernel"
    np.testing.assert_array_equal(np.asarray(lora.flatten_paths(s.state.adapters)[path].b),
                                  np.asarray(lora.flatten_paths(ad)[path].b))
    assert float(jnp.abs(lora.flatten_paths(s.state.adapters)[path].b).max()) > 0  # B != 0
    np.testing.assert_array_equal(np.asarray(lora.flatten_paths(s.base)[path].codes),
                                  np.asarray(lora.flatten_paths(loaded.params)[path].codes))
    pieces = export.RunPieces(s.loaded.config, s.base, s.state.adapters, s.loaded.tokenizer,
                              s.spec, "tiny-llama", 0)
    with pytest.raises(CheckpointError, match="LoftQ-quantized base; export it 'merged'"):
        export.export(None, "peft", tmp_path / "peft", pieces=pieces)
