"""Interrupt and resume a training run (acceptance of the checkpoint issue).

An interrupted run, resumed from its run directory, must write exactly what the same run
uninterrupted writes: the same per-step metrics (floats compared for equality) and the same
checkpointed TrainState (adapters, optimizer state, step, rng) bit for bit, on CPU.

All runs use the random `tiny-llama` model on a tiny corpus. Compiling the train and eval
steps dominates a run's cost (~20-30 s per `train.run` on 2 cores, ~3 s of actual work), and
each `train.run` builds fresh jitted closures; so this module points JAX's persistent
compilation cache at a temporary folder for its own duration (restored afterwards). A cached
executable is the same XLA program, so this changes timings only, never results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlora import checkpoint as ckpt_lib
from jaxlora import cli, train
from jaxlora import config as C
from jaxlora.config import config_from_dict, dump_config
from jaxlora.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
STOP_AT = 6  # not a multiple of checkpoint.every: the stop itself must save
_TIMING = ("tokens_per_s", "elapsed_s")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------
_CACHE_OPTS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A module-private persistent compilation cache (timings only; see the docstring)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = tmp_path_factory.mktemp("jax_compile_cache")
    old = {k: getattr(jax.config, k) for k in _CACHE_OPTS}
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    try:
        yield path
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven cats sleep".split()
    for i in range(12):
        (corpus / f"d{i:02d}.txt").write_text(" ".join(rng.choice(words, 40)))
    return root


def _raw(root: Path, **sections) -> dict:
    raw = {
        "name": "resume",
        "output_dir": str(root / "runs"),
        "model": {"name": "tiny-llama"},
        "quant": {"qtype": "nf4"},
        "lora": {"rank": 4, "dropout": 0.1},  # dropout > 0: the rng must resume too
        "data": {
            "sources": [str(root / "corpus")],
            "validation_fraction": 0.2,
            "seq_len": 32,
            "batch_size": 2,
        },
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"steps": STEPS, "grad_accum": 2, "log_every": 1, "progress": False},
        "eval": {"every": 4, "batches": 2},
        "checkpoint": {"every": 4, "keep": 2},
    }
    for sec, fields in sections.items():
        raw[sec] = {**raw[sec], **fields}
    return raw


def _cfg(root: Path, **sections):
    return config_from_dict(_raw(root, **sections))


@contextlib.contextmanager
def sigterm_after(n_steps: int):
    """SIGTERM this process right after the `n_steps`-th train step of the next run.

    The signal reaches `train.loop.StopSignals` exactly as an external `kill` would; we refuse to
    send it unless the flag's handler is installed (never kill the test process).
    """
    orig = train.loop.compile_step
    calls = {"n": 0}

    def patched(*args):
        step = orig(*args)

        def wrapped(*a, **k):
            out = step(*a, **k)
            calls["n"] += 1
            if calls["n"] == n_steps:
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        return wrapped

    train.loop.compile_step = patched
    try:
        yield calls
    finally:
        train.loop.compile_step = orig


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in _TIMING} for x in lines if x]


def _train_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "loss" in r]


def _state_template(cfg):
    return train.setup(cfg).state


def _saved_state(run_dir: Path, step: int, template):
    """The raw TrainState of one checkpoint (a reader that never prunes anything)."""
    mgr = ckpt_lib.CheckpointManager(run_dir, keep=1000, keep_best=0, base=None)
    try:
        return mgr.restore(template, step=step).state
    finally:
        mgr.close()


def _assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def run_a(root) -> Path:
    """The uninterrupted reference run."""
    run_dir = root / "A"
    summary = train.run(_cfg(root), run_dir)
    assert summary["steps"] == STEPS
    return run_dir


@pytest.fixture(scope="module")
def interrupted(root, run_a) -> Path:
    """The same run stopped by SIGTERM after step STOP_AT (kept pristine: tests copy it)."""
    run_dir = root / "B_stopped"
    with sigterm_after(STOP_AT):
        out = train.run(_cfg(root), run_dir)
    assert out == {"stopped": "SIGTERM", "step": STOP_AT}
    assert _steps_on_disk(run_dir) == [4, STOP_AT]
    assert not (run_dir / "summary.json").exists()
    assert _train_steps(_records(run_dir)) == list(range(1, STOP_AT + 1))
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# 1. Exact resume
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed(root, interrupted, tmp_path_factory):
    """The interrupted run (a copy), resumed to the end with the same config."""
    run_b = _copy(interrupted, tmp_path_factory.mktemp("resumed") / "B")
    err = _stderr_of(lambda: train.run(_cfg(root), run_b))
    return run_b, err


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(root, run_a, resumed):
    run_b, err = resumed
    assert f"resumed {run_b} at step {STOP_AT}" in err

    # metrics.jsonl: both parts together equal the uninterrupted file, record for record
    # (train losses, grad norms, lrs and every eval record, none duplicated nor missing)
    rec_a, rec_b = _records(run_a), _records(run_b)
    assert _train_steps(rec_a) == list(range(1, STEPS + 1))
    assert [r["step"] for r in rec_a if "val_loss" in r] == [0, 4, 8, 12]
    assert rec_b == rec_a

    # the checkpointed states (adapters, optimizer state, step, rng) are identical
    assert _steps_on_disk(run_b) == _steps_on_disk(run_a) == [8, 12]
    template = _state_template(_cfg(root))
    for step in (8, 12):
        _assert_bitwise(_saved_state(run_b, step, template), _saved_state(run_a, step, template))
    # and the public reader agrees
    _assert_bitwise(train.open_run(run_b).adapters, train.open_run(run_a).adapters)


def test_resumed_summary_equals_uninterrupted_summary(run_a, resumed):
    run_b, _ = resumed
    sa = json.loads((run_a / "summary.json").read_text())
    sb = json.loads((run_b / "summary.json").read_text())
    for key in ("steps", "train_loss", "val_loss", "val_ppl", "val_loss_before"):
        assert sb[key] == sa[key], key


def test_resuming_a_finished_run_changes_nothing(root, run_a, tmp_path, capsys):
    run_dir = _copy(run_a, tmp_path / "A2")
    before = _snapshot(run_dir)
    summary = train.run(_cfg(root), run_dir)
    assert "already finished" in capsys.readouterr().err
    assert summary == json.loads((run_a / "summary.json").read_text())
    assert _snapshot(run_dir) == before


@pytest.mark.slow
def test_resume_inside_a_log_window_keeps_the_logged_means(root, tmp_path):
    cfg = _cfg(root, train={"log_every": 3})
    full = train.run(cfg, tmp_path / "full")
    assert full["steps"] == STEPS
    with sigterm_after(4):  # steps 4 of the window 4..6 is done when the run stops
        train.run(cfg, tmp_path / "cut")
    train.run(cfg, tmp_path / "cut")
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")


# --------------------------------------------------------------------------------------------
# 2. SIGTERM to `jaxlora train` in a subprocess, then the same command again
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_then_same_command_resumes(root, tmp_path, compile_cache):
    steps = 300  # enough to be still running when the signal comes; ~10 ms a step
    cfg = _cfg(
        root,
        train={"steps": steps, "log_every": 1},
        eval={"every": 0, "batches": 1},
        checkpoint={"every": 0},
    )
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "runs"), name="sub")
    toml = tmp_path / "sub.toml"
    toml.write_text(dump_config(cfg))
    run_dir = tmp_path / "runs" / "sub"
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PLATFORMS": "cpu",
    }
    cmd = [sys.executable, "-m", "jaxlora.cli", "train", str(toml)]

    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(_train_steps(_records_safe(run_dir))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    stopped = _train_steps(_records(run_dir))[-1]
    assert 3 <= stopped < steps
    assert f"SIGTERM received; saved step {stopped}" in err
    assert "run the same command again to resume" in err
    assert _steps_on_disk(run_dir) == [stopped]
    assert not (run_dir / "summary.json").exists()

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "holds checkpoints of an unfinished run; resuming it" in again.stderr
    assert f"resumed {run_dir} at step {stopped}" in again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert _train_steps(_records(run_dir)) == list(range(1, steps + 1))
    assert _steps_on_disk(run_dir) == [stopped, steps]


def _records_safe(run_dir: Path) -> list[dict]:
    """Records of a metrics file that another process is appending to (last line may be cut)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


# --------------------------------------------------------------------------------------------
# 3. A damaged newest checkpoint: the run resumes from the previous one
# --------------------------------------------------------------------------------------------
def _damage(step_dir: Path) -> None:
    """Cut every state file to half its size, as a copy or a write stopped midway leaves it."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def fallback_run(root, run_a, interrupted, tmp_path_factory):
    run_dir = _copy(interrupted, tmp_path_factory.mktemp("fallback") / "C")
    _damage(run_dir / "checkpoints" / str(STOP_AT))
    err = _stderr_of(lambda: train.run(_cfg(root), run_dir), expect_warning=True)
    return run_dir, err


def _stderr_of(fn, expect_warning=False):
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stderr(buf):
        warnings.simplefilter("always")
        fn()
    damaged = [w for w in caught if "skipping damaged checkpoint" in str(w.message)]
    if expect_warning:
        assert damaged, [str(w.message) for w in caught]
        assert f"/checkpoints/{STOP_AT}" in str(damaged[0].message)
    return buf.getvalue()


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(root, run_a, fallback_run):
    run_dir, err = fallback_run
    assert f"resumed {run_dir} at step 4" in err
    # the replayed steps 5..12 are the uninterrupted run's: the last record of each step
    # equals run A's, and the final state is bitwise identical
    last = {}
    for r in _records(run_dir):
        last[(r["step"], "loss" in r)] = r
    assert last == {(r["step"], "loss" in r): r for r in _records(run_a)}
    template = _state_template(_cfg(root))
    _assert_bitwise(_saved_state(run_dir, STEPS, template), _saved_state(run_a, STEPS, template))


def test_fallback_resume_does_not_duplicate_metrics(run_a, fallback_run):
    run_dir, _ = fallback_run
    assert _records(run_dir) == _records(run_a)


def test_stop_on_a_damaged_step_saves_it_again(root, tmp_path):
    cfg = _cfg(root, checkpoint={"every": 2, "keep": 3})
    run_dir = tmp_path / "D"
    with sigterm_after(STOP_AT):
        train.run(cfg, run_dir)
    _damage(run_dir / "checkpoints" / str(STOP_AT))
    with sigterm_after(2):  # resumed at 4: stops again right after step 6
        _stderr_of(lambda: train.run(cfg, run_dir), expect_warning=True)
    template = _state_template(cfg)
    mgr = ckpt_lib.CheckpointManager(run_dir, keep=1000, keep_best=0, base=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damaged checkpoint is skipped any more
        restored = mgr.restore(template)
    mgr.close()
    assert restored.step == STOP_AT


# --------------------------------------------------------------------------------------------
# 4. Adapters of one base restored onto another: refused, nothing written
# --------------------------------------------------------------------------------------------
def test_checkpoint_on_a_different_base_is_refused(root, interrupted, tmp_path):
    cfg = _cfg(root)
    run_dir = _copy(interrupted, tmp_path / "E")
    before = _snapshot(run_dir)
    quant = C.to_dict(cfg)["quant"]  # base.json records the [quant] table

    # same architecture and quantization, other weights (another init seed)
    other = train.setup(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1)))
    with pytest.raises(CheckpointError, match=r"different base model.*weights differ"):
        ckpt_lib.CheckpointManager(
            run_dir, base=ckpt_lib.base_record(other.base, name="tiny-llama", quant=quant)
        )
    # another quantization of the same model: named, with the leaves whose layout differs
    int8 = train.setup(
        dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, qtype="int8"))
    )
    with pytest.raises(CheckpointError, match=r"quant .*'nf4'.*'int8'") as info:
        ckpt_lib.CheckpointManager(run_dir, base=int8.base_record)
    assert "kernel" in str(info.value)
    # another model name
    with pytest.raises(CheckpointError, match=r"name 'tiny-llama' vs 'tiny-gpt2'"):
        ckpt_lib.CheckpointManager(
            run_dir,
            base={
                **json.loads((run_dir / "checkpoints" / "base.json").read_text()),
                "name": "tiny-gpt2",
            },
        )
    assert _snapshot(run_dir) == before

    # the run directory's base record no longer matches the base the config loads
    # (the model file behind the same name changed): train, open_run refuse to resume
    base_json = run_dir / "checkpoints" / "base.json"
    rec = json.loads(base_json.read_text())
    rec["fingerprint"] = "sha256:" + "0" * 64
    base_json.write_text(json.dumps(rec, indent=1, sort_keys=True))
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=r"different base model.*weights differ"):
        train.run(cfg, run_dir)
    with pytest.raises(CheckpointError, match=r"weights differ"):
        train.open_run(run_dir)
    assert _snapshot(run_dir) == before

    # a different config in the same run directory is refused before anything is loaded
    with pytest.raises(ConfigError, match="holds a different run"):
        train.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1)), run_dir)
    assert _snapshot(run_dir) == before


def test_restoring_never_deletes_checkpoints(root, interrupted, tmp_path):
    run_dir = _copy(interrupted, tmp_path / "F")
    before = _snapshot(run_dir)
    mgr = ckpt_lib.CheckpointManager(run_dir, keep=1, keep_best=0, base=None)
    assert mgr.restore(_state_template(_cfg(root))).step == STOP_AT
    mgr.close()
    assert _snapshot(run_dir) == before


# --------------------------------------------------------------------------------------------
# 5. The command line: `jaxlora train CONFIG --resume`, and resuming without the flag
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [["--resume"], []], ids=["--resume", "automatic"])
def test_cli_train_resumes(root, run_a, tmp_path, capsys, flag):
    cfg = _cfg(root)
    toml = tmp_path / "resume.toml"
    toml.write_text(dump_config(cfg))
    run_dir = tmp_path / "run"
    args = ["train", str(toml), "--run-dir", str(run_dir)]
    with sigterm_after(3):
        assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "SIGTERM received; saved step 3" in err
    assert _steps_on_disk(run_dir) == [3]

    assert cli.main(args + flag) == 0
    out, err = capsys.readouterr()
    assert f"resumed {run_dir} at step 3" in err
    assert ("holds checkpoints of an unfinished run; resuming it" in err) == (not flag)
    assert "held-out loss" in out and "run directory" in out
    assert (run_dir / "summary.json").is_file()
    assert _records(run_dir) == _records(run_a)
