"""Tests for jaxlora.quant.tree: `select`, `quantize_tree` and `report` over parameter trees,
and the loader's quantize-on-load hook, which applies the same `select`."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import quant
from jaxlora.errors import ModelLoadError
from jaxlora.quant import QTensor, QuantRules, dequantize, quantize, quantize_tree

sys.path.insert(0, str(Path(__file__).parent))
from io_helpers import random_params, tiny_llama, write_gguf  # noqa: E402


def normal(shape, seed=0, scale=1.0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------------------------------ trees
def _nnx_params():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(50, 64, rngs=rngs)
            self.attn_norm = nnx.RMSNorm(64, rngs=rngs)
            self.q_proj = nnx.Linear(64, 96, rngs=rngs)
            self.down_proj = nnx.Linear(96, 64, use_bias=False, rngs=rngs)
            self.lm_head = nnx.Linear(64, 50, use_bias=False, rngs=rngs)

    return nnx.to_pure_dict(nnx.state(Tiny(nnx.Rngs(0))))


def test_quantize_tree_nnx_model():
    params = _nnx_params()
    qp, rep = quantize_tree(params, QuantRules())
    assert isinstance(qp["q_proj"]["kernel"], QTensor)
    assert isinstance(qp["down_proj"]["kernel"], QTensor)
    for path in (
        ("embed", "embedding"),
        ("attn_norm", "scale"),
        ("q_proj", "bias"),
        ("lm_head", "kernel"),
    ):
        leaf = qp[path[0]][path[1]]
        assert not isinstance(leaf, QTensor)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(params[path[0]][path[1]]))
    assert {lf.path for lf in rep.leaves if lf.stored == "nf4"} == {
        "q_proj/kernel",
        "down_proj/kernel",
    }
    assert rep.quantized_params == 2 * 64 * 96
    assert rep.quantized_bytes == qp["q_proj"]["kernel"].nbytes + qp["down_proj"]["kernel"].nbytes
    assert rep.total_params == sum(x.size for x in jax.tree.leaves(params))
    assert rep.total_bytes == rep.quantized_bytes + rep.float_bytes
    assert rep.float_bytes == 4 * rep.float_params
    assert 4.1 < rep.quantized_bits_per_param < 4.2 and rep.bits_per_param < 32
    assert "| q_proj/kernel |" in rep.table()
    # jitted forward through a quantized leaf
    y = jax.jit(lambda p, x: x @ dequantize(p["q_proj"]["kernel"]))(qp, jnp.ones((2, 64)))
    assert y.shape == (2, 96)


def test_quantize_tree_stacked_and_none():
    params = {
        "layers": {
            "attn": {"q_proj": {"kernel": jnp.asarray(normal((3, 32, 64)))}},
            "mlp_norm": {"scale": jnp.ones((3, 32))},
        },
        "embed": {"embedding": jnp.ones((10, 32))},
    }
    qp, rep = quantize_tree(params, QuantRules(qtype="int8", double_quant=False))
    q = qp["layers"]["attn"]["q_proj"]["kernel"]
    assert q.batch_shape == (3,) and q.item_shape == (32, 64) and q.qtype == "int8"
    assert not isinstance(qp["layers"]["mlp_norm"]["scale"], QTensor)
    qn, repn = quantize_tree(params, QuantRules(qtype="none"))
    assert not any(
        isinstance(lf, QTensor)
        for lf in jax.tree.leaves(qn, is_leaf=lambda a: isinstance(a, QTensor))
    )
    assert repn.quantized_params == 0 and repn.bits_per_param == 32.0


def test_quantize_tree_error_names_path_and_returns_nothing():
    bad = np.ones((32, 64), np.float32)
    bad[3, 3] = np.nan
    params = {"a": {"kernel": jnp.asarray(normal((32, 64)))}, "b": {"kernel": jnp.asarray(bad)}}
    with pytest.raises(ValueError, match=r"'b/kernel'.*NaN"):
        quantize_tree(params)
    assert not isinstance(params["a"]["kernel"], QTensor)  # input untouched
    with pytest.raises(ValueError, match="block_size"):
        quantize_tree(params, QuantRules(block_size=3))


# ------------------------------------------------------------------ select
@pytest.mark.parametrize(
    "path,ndim,want",
    [
        ("layers/attn/q_proj/kernel", 3, 1),  # stacked: one block grid per layer
        ("layers/mlp/down_proj/kernel", 3, 1),
        ("q_proj/kernel", 2, 0),  # not under layers/: quantized whole
        ("lm_head/kernel", 2, None),  # excluded: the LM head stays float
        ("embed/embedding", 2, None),  # not included
        ("layers/mlp_norm/scale", 2, None),
        ("layers/attn/q_proj/bias", 2, None),
        ("layers/attn/q_proj/lora_a", 3, None),
    ],
)
def test_select_default_rules(path, ndim, want):
    assert quant.select(QuantRules(), path, ndim) == want


def test_select_none_and_custom_rules():
    assert quant.select(QuantRules(qtype="none"), "layers/attn/q_proj/kernel", 3) is None
    rules = QuantRules(include=r"kernel$|embedding$", exclude=r"norm", stacked=r"^layers/|^embed/")
    assert quant.select(rules, "embed/embedding", 2) == 1
    assert quant.select(rules, "lm_head/kernel", 2) == 0
    with pytest.raises(ValueError, match=r"'layers/x/kernel'.*rank >= 2, got rank 1"):
        quant.select(QuantRules(), "layers/x/kernel", 1)


# ------------------------------------------------------------------ report
def test_report_hand_computed_bytes():
    """float, NF4 with and without double quant, stacked int8: bytes counted by hand."""
    tree = {
        "embed": {"embedding": jnp.ones((10, 32), jnp.float32)},  # 320 params, 4 B each
        "norm": {"scale": jnp.ones((7,), jnp.bfloat16)},  # 7 params, 2 B each
        # 33 * 65 = 2145 params, 34 blocks of 64: 1073 packed bytes + 34 float32 absmax
        "a": {"kernel": quantize(normal((33, 65), seed=1), "nf4", 64, False)},
        # + double quant: 34 uint8 absmax codes, one float32 nested absmax, one float32 offset
        "b": {"kernel": quantize(normal((33, 65), seed=2), "nf4", 64, True)},
        # 3 layers of 40 * 50 = 2000 int8 codes in 32 blocks (32 float32 absmax) each
        "layers": {"k": quantize(normal((3, 40, 50), seed=3), "int8", 64, False, batch_dims=1)},
    }
    rep = quant.report(tree)
    rows = {lf.path: (lf.shape, lf.stored, lf.params, lf.nbytes) for lf in rep.leaves}
    assert rows == {
        "embed/embedding": ((10, 32), "float32", 320, 1280),
        "norm/scale": ((7,), "bfloat16", 7, 14),
        "a/kernel": ((33, 65), "nf4", 2145, 1073 + 4 * 34),
        "b/kernel": ((33, 65), "nf4", 2145, 1073 + 34 + 4 + 4),
        "layers/k": ((3, 40, 50), "int8", 6000, 3 * (2000 + 4 * 32)),
    }
    assert [lf.path for lf in rep.leaves] == list(rows)  # tree order
    assert rep.float_params == 327 and rep.float_bytes == 1294
    assert rep.quantized_params == 2145 * 2 + 6000
    assert rep.quantized_bytes == 1209 + 1115 + 6384
    assert rep.total_bytes == 1294 + 1209 + 1115 + 6384
    assert rep.bits_per_param == pytest.approx(8 * rep.total_bytes / (327 + 10290))
    assert rows["b/kernel"][3] == tree["b"]["kernel"].nbytes  # QTensor.nbytes agrees


def test_report_is_quantize_tree_report():
    params = {
        "layers": {"attn": {"q_proj": {"kernel": jnp.asarray(normal((2, 32, 64), seed=4))}}},
        "embed": {"embedding": jnp.ones((10, 32))},
    }
    qp, rep = quantize_tree(params)
    assert quant.report(qp) == rep
    # the report without quantizing: what quantize_tree(qtype="none") returned for it
    assert quant.report(qp) == quantize_tree(qp, QuantRules(qtype="none"))[1]
    assert quant.report(params) == quantize_tree(params, QuantRules(qtype="none"))[1]
    traced = []  # under jit too: it reads shapes and dtypes only
    jax.jit(lambda p: traced.append(quant.report(p)) or 0)(qp)
    assert set(traced[0].leaves) == set(rep.leaves)  # (jit sorts the keys)
    assert quant.report({}).total_params == 0


# ------------------------------------------------------------------ quantize on load
def test_load_with_custom_stacked_rules_equals_quantize_tree(tmp_path):
    """The loader selects with `select`: a non-layer tensor matched by `stacked` is quantized
    per row (batch_dims=1), exactly as quantize_tree does on the float tree."""
    cfg = tiny_llama(tie_embeddings=False)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_params(cfg, seed=5))
    rules = QuantRules(
        qtype="int8",
        double_quant=False,
        include=r"kernel$|embedding$",
        exclude=r"norm|lm_head",
        stacked=r"^layers/|^embed/",
    )
    from jaxlora.io import load_model

    got = load_model(path, quant=rules).params
    want, _ = quantize_tree(load_model(path).params, rules)
    emb = got["embed"]["embedding"]
    assert isinstance(emb, QTensor) and emb.batch_shape == (cfg.vocab_size,)
    assert not isinstance(got["lm_head"]["kernel"], QTensor)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_refuses_rules_that_cannot_stream(tmp_path):
    """A per-layer tensor that `stacked` does not match would be quantized whole by
    quantize_tree; streaming cannot do that, so loading refuses instead of diverging."""
    cfg = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_params(cfg, seed=6))
    from jaxlora.io import load_model

    with pytest.raises(ModelLoadError, match=r"layers/.*kernel\[layer 0\].*rules.stacked"):
        load_model(path, quant=QuantRules(stacked=r"^nothing/"))
