"""Tests for jaxlora.kernels: the fused 4-bit dequantize-matmul against the XLA path.

Off GPU the Pallas kernels run in interpret mode, the same kernel body that lowers through
Triton on GPU; each test compares the kernel path (``kernel="pallas"``) with the XLA path
(``kernel="xla"``) and with a float64 reference, and checks that the kernel really ran (a
``pallas_call`` in the program) so that a silent fallback cannot pass.
"""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from lora_helpers import f64, randomize, relerr, rnd

from jaxlora import io, lora, models, quant, train
from jaxlora.config import ConfigError, load_config
from jaxlora.kernels import dispatch, nf4_matmul
from jaxlora.lora import LoraSpec, LoraWeight
from jaxlora.paths import flatten_paths

K, N = 128, 192  # N = 3 tiles of 64 (the quant block): not a power of two


@pytest.fixture(autouse=True)
def _float32_matmuls_in_float32():
    """Full-precision float32 dots, so the comparisons mean the same on a GPU (where XLA's
    default is TF32) as on CPU."""
    with jax.default_matmul_precision("highest"):
        yield


def with_kernel(tree, mode: str):
    """The tree with every QTensor's matmul mode set to ``mode``."""
    return jax.tree.map(
        lambda t: dataclasses.replace(t, kernel=mode) if isinstance(t, quant.QTensor) else t,
        tree, is_leaf=lambda t: isinstance(t, quant.QTensor),
    )


def n_pallas_calls(fn, *args) -> int:
    """How many ``pallas_call`` equations the traced program of ``fn(*args)`` holds."""

    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "pallas_call"
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        n += count(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        n += count(sub)
        return n

    # A fresh function each time: make_jaxpr caches traces by function and input types.
    return count(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decoded_tile_equals_dequantize_bit_for_bit(qtype, dtype):
    q = quant.quantize(rnd("w", (K, N)), qtype, 64, double_quant=True)
    codes = q.codes.reshape(K, N // 2)
    scales = quant.block_absmax(q).reshape(K, N // 64)
    got = jax.jit(nf4_matmul.decode_tile, static_argnums=(2, 3, 4))(codes, scales, qtype, 64,
                                                                    dtype)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(quant.dequantize(q, dtype)))


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead", [(3, 7), (1,), (130,)])  # 21, 1 and 130 rows: tails of a tile
def test_forward_and_input_gradient_match_the_xla_path(qtype, dtype, lead):
    q = quant.quantize(rnd(("w", qtype), (K, N)), qtype, 64, double_quant=qtype != "int4")
    x = rnd("x", (*lead, K)).astype(dtype)
    ct = rnd("ct", (*lead, N)).astype(dtype)

    def y_and_dx(x, w):
        y, back = jax.vjp(lambda x_: lora.linear(x_, w), x)
        return y, back(ct)[0]

    fn = jax.jit(y_and_dx)
    y, dx = fn(x, with_kernel(q, "pallas"))
    y_xla, dx_xla = fn(x, with_kernel(q, "xla"))
    assert n_pallas_calls(y_and_dx, x, with_kernel(q, "pallas")) == 2  # forward and dx
    assert n_pallas_calls(y_and_dx, x, with_kernel(q, "xla")) == 0
    assert y.shape == (*lead, N) and y.dtype == dtype and dx.shape == x.shape
    wd = f64(quant.dequantize(q, dtype))  # the weight both paths use, exactly
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert relerr(y, f64(x) @ wd) < tol and relerr(y, f64(y_xla)) < tol
    assert relerr(dx, f64(ct) @ wd.T) < tol and relerr(dx, f64(dx_xla)) < tol


def test_multi_axis_output_kernel():
    """A ``[K, heads, head_dim]`` kernel (flattened row-major, as the codes are)."""
    q = quant.quantize(rnd("w3", (K, 3, 64)), "nf4", 64)
    x = rnd("x3", (5, K))
    y = jax.jit(lora.linear)(x, with_kernel(q, "pallas"))
    assert y.shape == (5, 3, 64)
    assert relerr(y, np.einsum("mk,khd->mhd", f64(x), f64(quant.dequantize(q)))) < 1e-5


def test_stacked_kernels_in_a_scan_match_the_xla_path():
    """A stacked ``[L, K, K]`` QTensor sliced by ``lax.scan``, as the models run their layers."""
    q = quant.quantize(rnd("stack", (3, K, K)) / np.sqrt(K), "nf4", 64, batch_dims=1)
    x = rnd("xs", (2, 9, K))

    def loss(x, w):
        def layer(h, wl):
            return jnp.tanh(lora.linear(h, wl)), None

        h, _ = jax.lax.scan(layer, x, w)
        return jnp.sum(h**2)

    vg = jax.jit(jax.value_and_grad(loss))
    (v, g), (v_xla, g_xla) = vg(x, with_kernel(q, "pallas")), vg(x, with_kernel(q, "xla"))
    assert n_pallas_calls(jax.grad(loss), x, with_kernel(q, "pallas")) >= 2
    assert abs(float(v) - float(v_xla)) < 1e-5 * abs(float(v_xla))
    assert relerr(g, f64(g_xla)) < 1e-5


def test_backward_forms_no_dense_weight():
    """The custom VJP keeps codes and scales and computes dx only: no ``[K, N]`` float array
    exists in the gradient program (the XLA path, the control, dequantizes one)."""
    q = quant.quantize(rnd("wd", (K, N)), "nf4", 64)
    x = rnd("xd", (4, K))

    def dense_shapes(mode):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(lora.linear(x, w) ** 2)))(
            x, with_kernel(q, mode))
        return [v.aval for e in jaxpr.eqns for v in e.outvars
                if getattr(v.aval, "shape", None) == (K, N)
                and jnp.issubdtype(v.aval.dtype, jnp.floating)]

    assert dense_shapes("pallas") == []
    assert dense_shapes("xla") != []


def test_lora_weight_over_a_kernel_base_is_not_folded():
    """``x . (W + sAB)`` would form a dense weight: with the kernel the adapter runs apart."""
    q = quant.quantize(rnd("wl", (K, N)), "nf4", 64)
    a, b, x = rnd("al", (K, 4)), rnd("bl", (4, N)), rnd("xl", (6, K))

    def loss(x, a, b, w):
        return jnp.sum(lora.linear(x, LoraWeight(w, a, b, scale=0.5)) ** 2)

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    got, ref = g(x, a, b, with_kernel(q, "pallas")), g(x, a, b, with_kernel(q, "xla"))
    assert n_pallas_calls(jax.grad(loss), x, a, b, with_kernel(q, "pallas")) == 2
    for gk, gx in zip(got, ref, strict=True):
        assert relerr(gk, f64(gx)) < 1e-5


def test_qlora_train_step_with_the_kernel_equals_the_xla_path():
    """Loss and adapter gradients of the tiny Llama (nf4, block 32, loaded with
    ``quant.kernel``) through every linear layer: kernel path vs XLA path."""
    rules = quant.QuantRules(qtype="nf4", block_size=32, kernel="pallas")
    m = io.load_model("tiny-llama", quant=rules)
    kinds = {leaf.kernel for leaf in flatten_paths(m.params).values()
             if isinstance(leaf, quant.QTensor)}
    assert kinds == {"pallas"}  # the config key reaches every quantized leaf
    adapters = randomize(lora.init(jax.random.key(0), m.params, LoraSpec(rank=4,
                                                                         targets="all-linear")))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, m.config.vocab_size, (2, 17)), jnp.int32)
    b = _batch(tokens)

    def loss(adapters, base):
        total, count = train.loss_and_count(adapters, base, b, mcfg=m.config, remat="attn")
        return total / count

    vg = jax.jit(jax.value_and_grad(loss))
    (v, g) = vg(adapters, m.params)
    (v_xla, g_xla) = vg(adapters, with_kernel(m.params, "xla"))
    assert n_pallas_calls(jax.grad(loss), adapters, m.params) > 0
    assert abs(float(v) - float(v_xla)) < 1e-5 * abs(float(v_xla))
    for (path, gk), gx in zip(flatten_paths(g).items(), flatten_paths(g_xla).values(),
                              strict=True):
        for name in ("a", "b"):
            ref = f64(getattr(gx, name))
            assert relerr(getattr(gk, name), ref) < 1e-4, (path, name)


def _batch(tokens):
    from jaxlora import data

    rows, seq = tokens.shape[0], tokens.shape[1] - 1
    return data.Batch(
        inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=jnp.ones((rows, seq)),
        segment_ids=jnp.ones((rows, seq), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq)),
    )


@pytest.mark.parametrize("qtype, shape, batch_dims", [
    ("int8", (K, N), 0),  # one code per byte: not a 4-bit format
    ("nf4", (K, 96), 0),  # 96 columns: no power-of-two multiple of the 64-block divides them
    ("nf4", (2, K, N), 1),  # a stacked leaf outside its scan
])
def test_pallas_mode_refuses_what_the_kernel_cannot_take(qtype, shape, batch_dims):
    q = quant.quantize(rnd("r", shape), qtype, 64, batch_dims=batch_dims, kernel="pallas")
    with pytest.raises(ValueError, match="quant.kernel 'pallas': the kernel cannot take"):
        jax.jit(lora.linear)(rnd("xr", (3, K)), q)


def test_auto_is_the_xla_path_off_gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "_platform", lambda: "cpu")  # as on CPU (also on a GPU)
    q = quant.quantize(rnd("wa", (K, N)), "nf4", 64)
    assert q.kernel == "auto"
    assert n_pallas_calls(lora.linear, rnd("xa", (3, K)), q) == 0


def test_auto_on_gpu_follows_one_cached_measurement_per_shape(monkeypatch):
    monkeypatch.setattr(dispatch, "_platform", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_AUTO", {})
    q = quant.quantize(rnd("wg", (K, N)), "nf4", 64)
    x = rnd("xg", (4, K))
    # One real measurement, while the step is being traced (it must evaluate eagerly).
    assert n_pallas_calls(lora.linear, x, q) in (0, 1)
    [row] = dispatch.auto_choices()
    assert (row["m"], row["k"], row["n"]) == (4, K, N) and row["kernel_s"] > 0 < row["xla_s"]
    calls = []

    def fake(faster):
        def measure(*args, **kw):
            calls.append(args)
            return (1.0, 2.0) if faster else (2.0, 1.0)
        return measure

    for faster, expected in ((True, 1), (False, 0)):
        monkeypatch.setattr(dispatch, "_AUTO", {})
        monkeypatch.setattr(dispatch, "measure", fake(faster))
        assert n_pallas_calls(lora.linear, x, q) == expected
        assert n_pallas_calls(lora.linear, x + 1, q) == expected  # same shape: cached
    assert len(calls) == 2


@pytest.mark.parametrize("qtype", ["nf4", "int4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("m, k, n", [(8192, 576, 192), (21, 1536, 576), (4096, 2048, 8192)])
def test_kernels_lower_through_triton_for_gpu(qtype, dtype, m, k, n):
    """The same kernel bodies, lowered for CUDA on this machine by Pallas' Triton backend
    (power-of-two loads, supported primitives): forward and dx become Triton custom calls."""
    t = nf4_matmul.tiles_for(m, k, n, qtype, 64, interpret=False)
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n // 2), jnp.uint8),
            jax.ShapeDtypeStruct((k, n // 64), jnp.float32))

    def y_and_dx(x, codes, scales):
        y, back = jax.vjp(lambda x_: nf4_matmul.qmatmul(x_, codes, scales, t), x)
        return y, back(y)[0]

    text = jax.jit(y_and_dx).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2


def test_quant_kernel_config_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[quant]\nkernel = "pallas"\n')
    assert load_config(p).quant.kernel == "pallas"
    p.write_text('[quant]\nkernel = "triton"\n')
    with pytest.raises(ConfigError, match="quant.kernel"):
        load_config(p)
    tree, _ = quant.quantize_tree({"layers": {"kernel": rnd("t", (2, K, N))}},
                                  quant.QuantRules(kernel="xla"))
    assert tree["layers"]["kernel"].kernel == "xla"
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        quant.quantize(rnd("t", (K, N)), kernel="fast")


def test_the_matmul_path_is_not_part_of_a_run_or_its_base_record():
    """A run may resume on another machine with another ``quant.kernel``; the qtype (the
    control) still makes it another run and another base."""
    from jaxlora.checkpoint import base_record
    from jaxlora.config import Config
    from jaxlora.train.runs import same_run

    def cfg(**q):
        return Config(quant=quant.QuantRules(**q))

    assert same_run(cfg(kernel="xla"), cfg(kernel="pallas"))
    assert not same_run(cfg(qtype="nf4"), cfg(qtype="fp4"))
    base = {"w": rnd("b", (4, 4))}
    assert base_record(base, quant={"qtype": "nf4", "kernel": "pallas"})["quant"] == {
        "qtype": "nf4"}


def test_models_param_shapes_fit_the_kernel_tiles():
    """SmolLM2's projections (576 / 192 / 1536 wide) all have kernel tiles (block 64)."""
    cfg = models.ModelConfig.smollm2_135m()
    for path, shape in models.param_shapes(cfg).items():
        if path.startswith("layers/") and path.endswith("kernel"):
            _, k, *out = shape
            assert nf4_matmul.tiles_for(256, k, int(np.prod(out)), "nf4", 64, True), path


def test_gpu_suite_script_parses_and_names_existing_scripts():
    """`bash -n` of benchmarks/gpu_suite.sh, and every script or test file it runs exists.

    Its dry mode (``GPU_SUITE_DRY=1``: every command on CPU at tiny sizes) takes minutes on
    two cores, so it is run by hand (README), not here.
    """
    import re
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = set(re.findall(r"(?:benchmarks|tests)/[\w/]+\.py", script.read_text()))
    assert {"benchmarks/bench_train.py", "benchmarks/bench_population.py",
            "tests/test_kernels.py"} <= named
    assert all((repo / p).is_file() for p in named)
