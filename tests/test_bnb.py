"""Bit-exact parity with bitsandbytes 0.50 ``quantize_4bit`` and state-dict interop.

The reference arrays in tests/data/bnb_quantize_4bit.npz were produced by bitsandbytes itself
(tests/data/make_bnb_fixtures.py, run once in a scratch venv with torch + bitsandbytes);
torch and bitsandbytes are never imported here.
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxlora import quant
from jaxlora.io.bnb import from_bnb_state_dict, to_bnb_state_dict
from jaxlora.quant import QTensor, dequantize, quantize
from jaxlora.quant.codec import _quantize_dynamic

FIXTURE = np.load(os.path.join(os.path.dirname(__file__), "data", "bnb_quantize_4bit.npz"))
CASES = [
    (name, qt, dq)
    for name in ("big", "odd", "ties")
    for qt in ("nf4", "fp4")
    for dq in (False, True)
]


# bitsandbytes' dynamic map as float32 text, the literal jaxlora kept before building it
BNB_DYNAMIC_MAP = np.loadtxt(
    os.path.join(os.path.dirname(__file__), "data", "bnb_dynamic_map.txt"), np.float64
).astype(np.float32)


def key(name, qt, dq):
    return f"{name}/{qt}/{'dq' if dq else 'nodq'}"


def test_fixture_is_from_bitsandbytes_050():
    assert str(FIXTURE["version"]).startswith("0.50")
    np.testing.assert_array_equal(FIXTURE["big/nf4/dq/nested_code"], quant.DYNAMIC_CODE)


def test_dynamic_map_built_bit_exact_as_bitsandbytes():
    """`create_dynamic_map` reproduces bitsandbytes' float32 map bit for bit (sign of zero
    included), and the codec's `DYNAMIC_CODE` is that map."""
    bits = BNB_DYNAMIC_MAP.view(np.uint32)
    assert BNB_DYNAMIC_MAP.shape == (256,)
    np.testing.assert_array_equal(FIXTURE["big/nf4/dq/nested_code"].view(np.uint32), bits)
    np.testing.assert_array_equal(quant.create_dynamic_map(signed=True).view(np.uint32), bits)
    np.testing.assert_array_equal(quant.DYNAMIC_CODE.view(np.uint32), bits)


@pytest.mark.parametrize("name,qt,dq", CASES)
def test_codes_and_statistics_equal_bitsandbytes(name, qt, dq):
    x, k = FIXTURE[f"{name}/x"], key(name, qt, dq)
    q = quantize(x, qt, 64, dq)
    np.testing.assert_array_equal(np.asarray(q.codes), FIXTURE[f"{k}/codes"])
    np.testing.assert_array_equal(np.asarray(q.absmax), FIXTURE[f"{k}/absmax"])
    if dq:
        # offset: our mean is correctly rounded; torch's float32 sum may be 1 ulp off
        ref_off = FIXTURE[f"{k}/offset"]
        assert abs(float(q.offset) - float(ref_off)) <= float(np.spacing(ref_off))
        np.testing.assert_allclose(
            np.asarray(q.nested_absmax), FIXTURE[f"{k}/nested_absmax"], rtol=1e-6
        )


@pytest.mark.parametrize(
    "name,qt", [(n, t) for n in ("big", "odd", "ties") for t in ("nf4", "fp4")]
)
def test_nested_quantization_bit_exact_given_offset(name, qt):
    """Given bitsandbytes' offset, the 8-bit absmax codes and nested absmax are identical
    (this exercises bitsandbytes' 16-bit-grid lookup for the dynamic map)."""
    k = key(name, qt, True)
    absmax = FIXTURE[f"{key(name, qt, False)}/absmax"]
    codes, nested = jax.jit(_quantize_dynamic)(absmax - FIXTURE[f"{k}/offset"])
    np.testing.assert_array_equal(np.asarray(codes), FIXTURE[f"{k}/absmax"])
    np.testing.assert_array_equal(np.asarray(nested), FIXTURE[f"{k}/nested_absmax"])


@pytest.mark.parametrize("name,qt,dq", [c for c in CASES if c[0] != "big"])
def test_dequantize_equals_bitsandbytes(name, qt, dq):
    """Our dequantize of bitsandbytes' stored arrays is bit-identical to its dequantize_4bit."""
    k = key(name, qt, dq)
    shape = FIXTURE[f"{name}/x"].shape
    q = QTensor(
        FIXTURE[f"{k}/codes"],
        FIXTURE[f"{k}/absmax"],
        FIXTURE[f"{k}/nested_absmax"] if dq else None,
        np.float32(FIXTURE[f"{k}/offset"]) if dq else None,
        shape,
        "float32",
        qt,
        64,
        dq,
    )
    np.testing.assert_array_equal(np.asarray(dequantize(q)), FIXTURE[f"{k}/deq"])


def test_fp4_signed_zero_codes_like_bitsandbytes():
    """bitsandbytes sends (0, 1/384] to -0 (code 8) and [-1/384, 0] to +0 (code 0)."""
    x = np.zeros(64, np.float32)
    x[0], x[2], x[4] = 1.0, 1e-3, -1e-3
    nib = np.asarray(quant.unpack_nibbles(quantize(x, "fp4", 64, False).codes))
    assert nib[0] == 3 and nib[2] == 8 and nib[4] == 0 and nib[1] == 0


# ------------------------------------------------------------------ state dicts
def sd_fixture():
    return {k[len("sd/") :]: FIXTURE[k] for k in FIXTURE.files if k.startswith("sd/")}


def test_from_bnb_state_dict_reads_bitsandbytes_output():
    q = from_bnb_state_dict(sd_fixture())
    assert q.qtype == "nf4" and q.double_quant and q.shape == (33, 65) and q.block_size == 64
    np.testing.assert_array_equal(np.asarray(dequantize(q)), FIXTURE["odd/nf4/dq/deq"])


def test_to_bnb_state_dict_matches_bitsandbytes_layout():
    ref = sd_fixture()
    sd = to_bnb_state_dict(quantize(FIXTURE["odd/x"], "nf4", 64, True))
    assert set(sd) == set(ref)
    for k in sd:
        assert sd[k].dtype == ref[k].dtype and sd[k].shape[1:] == ref[k].shape[1:], k
    for k in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_quant_map"):
        np.testing.assert_array_equal(sd[k], ref[k])
    np.testing.assert_allclose(sd["weight.nested_absmax"], ref["weight.nested_absmax"], rtol=1e-6)
    qs = "weight.quant_state.bitsandbytes__nf4"
    ours, theirs = (json.loads(bytes(d[qs]).decode()) for d in (sd, ref))
    assert ours.pop("nested_offset") == pytest.approx(theirs.pop("nested_offset"), rel=1e-6)
    assert ours == theirs


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_state_dict_round_trip_with_torch_layout(qt, dq):
    kernel = (np.random.default_rng(0).standard_normal((48, 80)) * 0.02).astype(np.float32)
    q = quantize(kernel.T, qt, 64, dq)  # torch layout [out, in]
    sd = to_bnb_state_dict(q, "model.layers.0.mlp.up_proj.")
    assert sd["model.layers.0.mlp.up_proj.weight"].shape == (48 * 80 // 2, 1)
    back = from_bnb_state_dict(sd, "model.layers.0.mlp.up_proj.")
    assert back.shape == (80, 48) and back.qtype == qt and back.double_quant == dq
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(dequantize(back)).T, np.asarray(dequantize(q)).T)


def test_state_dict_errors():
    with pytest.raises(ValueError, match="nf4/fp4 only"):
        to_bnb_state_dict(quantize(np.ones((4, 64), np.float32), "int8"))
    with pytest.raises(ValueError, match="unbatched"):
        to_bnb_state_dict(quantize(np.ones((2, 4, 64), np.float32), batch_dims=1))
    sd = sd_fixture()
    del sd["weight.nested_absmax"]
    with pytest.raises(ValueError, match="missing key 'weight.nested_absmax'"):
        from_bnb_state_dict(sd)
    sd = sd_fixture()
    sd["weight.quant_map"] = quant.FP4_CODE
    with pytest.raises(ValueError, match="quant_map"):
        from_bnb_state_dict(sd)
    with pytest.raises(ValueError, match="bitsandbytes__nf4"):
        from_bnb_state_dict(sd_fixture(), "other.")
