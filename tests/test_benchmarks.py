"""The benchmark tools: the step profiler (benchmarks/profile_step.py: thunk times from a
trace, and the named scopes that let it charge every instruction of a compiled step to a part
of the model) and `make bench`'s writer of RESULTS.md (benchmarks/run_all.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train  # noqa: E402
import profile_step  # noqa: E402
import run_all  # noqa: E402


def _x(tid, ts, dur, name):
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name}


def test_thunk_times_charge_the_innermost_event_and_split_concurrent_ones():
    """A while thunk contains its body's thunks: each is charged only its own stretches; where
    two threads run thunks at once each gets half; other threads' events, the executor's own
    spans and end markers are left out. The charges add up to the busy wall time."""
    meta = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": n}}
            for t, n in [(7, "tf_XLAEigen/1"), (8, "python"), (9, "tf_XLAEigen/1")]]
    events = [
        _x(7, 0, 100, "while.1"), _x(7, 10, 20, "fusion.a"), _x(7, 40, 50, "fusion.b"),
        _x(7, 50, 10, "dot.c"), _x(7, 95, 0.5, "end: fusion.b"),
        _x(7, 0, 120, "ThunkExecutor::Execute"),
        _x(8, 0, 1000, "fusion.a"),  # the Python thread: not XLA's
        _x(9, 20, 5, "fusion.d"), _x(9, 30, 0, "fusion.e"),  # beside fusion.a; an empty one
    ]
    charged, runs = profile_step.thunk_times({"traceEvents": meta + events})
    assert dict(charged) == {"while.1": 30, "fusion.a": 17.5, "fusion.d": 2.5, "fusion.b": 40,
                             "dot.c": 10}
    assert sum(charged.values()) == 100
    assert runs == {"while.1": 1, "fusion.a": 1, "fusion.b": 1, "dot.c": 1, "fusion.d": 1,
                    "fusion.e": 1}


def test_matmul_flops_of_compiled_instructions():
    """2 x output elements x contracted size, for a plain and a transposed contraction."""
    import jax
    import jax.numpy as jnp

    def f(x, w, v):
        y = jnp.tanh(x @ w)  # [8, 16] x [16, 4]: 1024 FLOPs
        return jax.lax.dot_general(y, v, (((1,), (1,)), ((), ())))  # [8, 4] x [6, 4]^T: 384
    text = jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((6, 4))).compile().as_text()
    flops = sorted(fl for fl, _, _ in profile_step.instructions(text).values() if fl)
    assert flops == [384, 1024]


def test_classify_phases_and_scopes():
    assert profile_step.classify("jit(step)/jvp()/while/body/closed_call/attention/dot_general") \
        == ("attention", "forward")
    assert profile_step.classify(
        "jit(step)/transpose(jvp())/while/body/closed_call/checkpoint/rematted_computation/"
        "linear/effective_weight/dequantize/mul") == ("linear: dequantize", "remat")
    assert profile_step.classify("jit(step)/transpose(jvp())/while/body/norm/transpose") \
        == ("norm", "backward")
    assert profile_step.classify("jit(step)/add") == ("other", "forward")


def test_compiled_step_carries_every_scope():
    """The compiled QLoRA step of a tiny Llama (remat attn): every named scope appears in the
    phases it must, matmuls are found in the projections and none in the dequantization."""
    st = bench_train.build_step("qlora", batch=2, seq=16, rank=4, remat="attn",
                                model="llama-1b-tiny")
    instr = profile_step.instructions(st.compiled.as_text())
    keys = {profile_step.classify(op) for _, _, op in instr.values()}
    for scope in ("attention", "linear", "norm", "rope", "lm_head"):
        assert {(scope, "forward"), (scope, "backward")} <= keys, scope
    assert ("attention", "remat") in keys  # remat attn recomputes the attention
    assert {("linear: dequantize", "forward"), ("linear: W + sAB", "forward"),
            ("embed", "forward"), ("loss", "forward"), ("optimizer", "forward")} <= keys
    mm = {profile_step.classify(op) for is_mm, _, op in instr.values() if is_mm}
    assert ("linear", "forward") in mm and ("lm_head", "forward") in mm
    assert not any(k[0] == "linear: dequantize" for k in mm)


def test_results_section_is_added_once_then_replaced_and_the_rest_kept():
    notes = "# Benchmark results\n\nMachine: ...\n\n## Populations\n\n| a | b |\n"
    first = run_all.splice(notes, "## Latest run\n\n| x | 1 |\n")
    assert first == ("# Benchmark results\n\n" + run_all.BEGIN + "\n## Latest run\n\n| x | 1 |\n"
                     + run_all.END + "\n\nMachine: ...\n\n## Populations\n\n| a | b |\n")
    second = run_all.splice(first, "## Latest run\n\n| x | 2 |")
    assert second == first.replace("| x | 1 |", "| x | 2 |")
    assert run_all.splice(second, "## Latest run\n\n| x | 1 |") == first


def test_every_suite_benchmark_and_variant_exists():
    """`make bench` runs only scripts that exist, with variants bench_train knows."""
    here = Path(bench_train.__file__).parent
    for name, (script, *rest) in run_all.SUITE.items():
        assert (here / script).is_file(), name
        if script == "bench_train.py":
            variants = rest[rest.index("--variants") + 1].split(",")
            assert set(variants) <= set(bench_train.ALL_VARIANTS), variants
    assert {"qlora-fp4", "qlora-int4"} <= set(bench_train.QUANT_VARIANTS)


def test_rounds_merge_to_medians_with_each_rows_own_ceiling():
    """A variant's rounds merge to the median step (its tokens/s and model GFLOP/s rescaled to
    it), the median of the matmul rates measured beside its steps, and the largest peak RSS."""
    runs = [dict(variant="qlora", step_s=s, tokens_per_s=1024 / s, model_gflops=551 / s,
                 ceiling_gflops=c, peak_rss_mb=m)
            for s, c, m in [(6.0, 150.0, 880.0), (8.0, 100.0, 870.0), (7.0, 120.0, 900.0)]]
    row = bench_train._merge_rounds(runs)
    assert (row["step_s"], row["ceiling_gflops"], row["peak_rss_mb"]) == (7.0, 120.0, 900.0)
    assert abs(row["tokens_per_s"] - 1024 / 7.0) < 1e-9
    assert abs(row["model_gflops"] - 551 / 7.0) < 1e-9
    assert row["rounds"] == [6.0, 8.0, 7.0]


def test_ceiling_counts_its_matmuls_flops():
    c = bench_train.Ceiling(shape=(64, 32, 16))
    assert c.flops == 2 * 64 * 32 * 16
    assert c.f(*c.operands()).shape == (64, 16) and c.gflops(2) > 0
