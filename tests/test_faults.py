"""Kill a training run (SIGKILL) at many points, rerun the same command, check the run.

Each case starts `jaxlora train` in a subprocess whose launcher wraps one function so that its
n-th call kills the process (before or after the call): inside each checkpoint write (before
Orbax starts it, with the temporary folder written but not renamed, before retention deletes
an older step, with the deleted step moved aside but not removed), between the final
checkpoint and summary.json, during each evaluation, during start-up, after a metrics line.
The rerun must leave the run as one uninterrupted run leaves it: every metrics record once
(the same values), the final adapters bit for bit, the same checkpoint steps, no temporary or
half-deleted folder; and neither process may print anything but jaxlora's own lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config

REPO = Path(__file__).resolve().parents[1]
_TIMING = ("tokens_per_s", "elapsed_s")

# The launcher: JAXLORA_FAULT="module|Qualified.name|n|when" kills the process on the n-th
# call of that function (when: "before" or "after" it; "term": sends SIGTERM before it);
# then it runs the command line as `jaxlora` would.
LAUNCHER = r"""
import asyncio, functools, importlib, os, signal, sys
import jax
if os.environ.get("JAXLORA_TEST_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAXLORA_TEST_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
spec = os.environ.get("JAXLORA_FAULT")
if spec:
    module, name, n, when = spec.split("|")
    owner = importlib.import_module(module)
    *parents, attr = name.split(".")
    for p in parents:
        owner = getattr(owner, p)
    fn, calls = getattr(owner, attr), [0]
    def due():
        calls[0] += 1
        return calls[0] == int(n)
    def kill():
        os.kill(os.getpid(), signal.SIGTERM if when == "term" else signal.SIGKILL)
    if asyncio.iscoroutinefunction(fn):
        async def wrapped(*a, **k):
            hit = due()
            if hit and when != "after": kill()
            out = await fn(*a, **k)
            if hit and when == "after": kill()
            return out
    else:
        def wrapped(*a, **k):
            hit = due()
            if hit and when != "after": kill()
            out = fn(*a, **k)
            if hit and when == "after": kill()
            return out
    setattr(owner, attr, functools.wraps(fn)(wrapped))
from jaxlora import cli
sys.exit(cli.main(sys.argv[1:]))
"""

STEPS, EVERY, KEEP = 6, 2, 1  # checkpoints at 2, 4, 6; each save deletes the one before
_ORBAX_SAVE = "jaxlora.checkpoint.manager|_OrbaxManager.save"
_FINALIZE = "orbax.checkpoint._src.path.atomicity|AtomicRenameTemporaryPath.finalize"
_DELETE = "orbax.checkpoint._src.path.deleter|StandardCheckpointDeleter.delete"
_PURGE = "jaxlora.checkpoint.manager|CheckpointManager._purge_trash"
_EVAL = "jaxlora.train.runs|evaluate"
FAULTS = {
    # start-up
    "loading the model": "jaxlora.train.assemble|load_base|1|before",
    "after config.toml": "jaxlora.train.runs|write_atomic|1|after",
    "mid config.toml": "pathlib|Path.write_text|1|after",
    # evaluations: the base before training, step 2, the final one
    "eval before training": f"{_EVAL}|1|before",
    "eval at step 2": f"{_EVAL}|2|before",
    "final eval": f"{_EVAL}|4|before",
    "after the step-0 record": "jaxlora.train.loop|MetricsLog.emit|1|after",
    # each checkpoint write
    "save 2 starts": f"{_ORBAX_SAVE}|1|before",
    "save 2 written, not renamed": f"{_FINALIZE}|1|before",
    "save 4 written, not renamed": f"{_FINALIZE}|2|before",
    "save 4 renamed, 2 not deleted": f"{_DELETE}|1|before",
    "save 4, 2 moved aside": f"{_PURGE}|3|before",
    "final save written, not renamed": f"{_FINALIZE}|3|before",
    # between the final checkpoint and summary.json
    "after the final save": "jaxlora.train.runs|finish_run|1|before",
    "after the samples": "jaxlora.train.runs|_samples|1|after",
    "before summary.json": "jaxlora.train.runs|write_atomic|3|before",
}


def _cmd(config: Path) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, "train", str(config)]


def _run(config: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAXLORA_FAULT", "JAXLORA_DEBUG")}
    env["JAX_PLATFORMS"] = "cpu"
    if fault:
        env["JAXLORA_FAULT"] = fault
    return subprocess.run(_cmd(config), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def _config(folder: Path) -> Path:
    path = write_tiny_config(folder, "kill", steps=STEPS)
    text = path.read_text().replace("[checkpoint]\n", f"[checkpoint]\nkeep = {KEEP}\n"
                                    "keep_best = false\n")
    text = text.replace("every = 2\nasync_save", f"every = {EVERY}\nasync_save")
    path.write_text(text)
    return path


def _records(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in _TIMING})
    return out


def _tree(run_dir: Path) -> list[str]:
    """Every path down to a checkpoint's items (Orbax names the data files inside at random)."""
    return sorted({"/".join(p.relative_to(run_dir).parts[:3]) for p in run_dir.rglob("*")})


def _adapters(run_dir: Path) -> dict[str, np.ndarray]:
    import jax

    from jaxlora import train

    leaves = jax.tree_util.tree_flatten_with_path(train.open_run(run_dir).adapters)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _assert_only_jaxlora_lines(stderr: str) -> None:
    bad = [line for line in stderr.splitlines() if not line.startswith("jaxlora: ")]
    assert not bad, stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    config = _config(folder)
    p = _run(config)
    assert p.returncode == 0, p.stderr
    _assert_only_jaxlora_lines(p.stderr)
    run_dir = folder / "runs" / "kill"
    return run_dir, _records(run_dir), _adapters(run_dir), _tree(run_dir)


def test_the_reference_run_is_what_the_cases_compare_against(reference):
    run_dir, records, _, tree = reference
    evals = [r["step"] for r in records if "val_loss" in r]
    losses = [r["step"] for r in records if "loss" in r]
    assert evals == [0, 2, 4, 6] and losses == [2, 4, 6]
    steps = [p for p in tree if p.startswith("checkpoints/") and p.count("/") == 1]
    assert steps == ["checkpoints/6", "checkpoints/base.json"], tree


# the cases run on every test run; the others are marked slow (about 11 s a case on 2 cores)
QUICK = ("save 4 written, not renamed", "save 4, 2 moved aside", "after the final save",
         "eval at step 2")


@pytest.mark.parametrize(
    "case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in FAULTS]
)
def test_kill_then_rerun_leaves_the_uninterrupted_run(case, reference, tmp_path):
    config = _config(tmp_path)
    killed = _run(config, FAULTS[case])
    assert killed.returncode == -signal.SIGKILL, (case, killed.returncode, killed.stderr)
    _assert_only_jaxlora_lines(killed.stderr)
    _rerun_equals_reference(config, tmp_path / "runs" / "kill", reference)


def _rerun_equals_reference(config: Path, run_dir: Path, reference) -> str:
    ref_dir, ref_records, ref_adapters, ref_tree = reference
    again = _run(config)
    assert again.returncode == 0, again.stderr
    _assert_only_jaxlora_lines(again.stderr)
    assert _records(run_dir) == ref_records
    assert _tree(run_dir) == ref_tree  # no temporary, half-deleted or extra folder
    got = _adapters(run_dir)
    assert got.keys() == ref_adapters.keys()
    for k, v in ref_adapters.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss"] == json.loads((ref_dir / "summary.json").read_text())["val_loss"]
    return again.stderr


def test_sigterm_during_start_up_exits_0_then_the_rerun_trains(reference, tmp_path):
    config = _config(tmp_path)
    stopped = _run(config, "jaxlora.train.assemble|load_base|1|term")
    assert stopped.returncode == 0, stopped.stderr
    lines = stopped.stderr.splitlines()
    plan_lines = [x for x in lines if x.startswith(("jaxlora: memory plan", "jaxlora:   "))]
    assert plan_lines and lines[:len(plan_lines)] == plan_lines  # printed before loading
    assert lines[len(plan_lines):] == [
        "jaxlora: SIGTERM received outside training; stopped (the same command picks up from "
        "the last checkpoint)"
    ]
    _rerun_equals_reference(config, tmp_path / "runs" / "kill", reference)


def _damage(step_dir: Path) -> None:
    """Cut every state file to half its size, as a write stopped midway leaves it."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_damaged_newest_checkpoint_one_warning_line_then_the_uninterrupted_run(
    reference, tmp_path, async_save
):
    config = _config(tmp_path)
    if async_save:  # the rewritten step 4 is deleted again in the background
        config.write_text(config.read_text().replace("async_save = false", "async_save = true"))
    run_dir = tmp_path / "runs" / "kill"
    killed = _run(config, FAULTS["save 4 renamed, 2 not deleted"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4", "base.json"]
    _damage(run_dir / "checkpoints" / "4")
    err = _rerun_equals_reference(config, run_dir, reference)
    warned = [line for line in err.splitlines() if "skipping damaged" in line]
    assert len(warned) == 1, err
    assert warned[0].startswith(f"jaxlora: warning: skipping damaged checkpoint: {run_dir}")
    assert "checkpoints/4: state unreadable" in warned[0]
    assert f"jaxlora: resumed {run_dir} at step 2" in err


def test_no_readable_checkpoint_is_one_error_line(reference, tmp_path):
    config = _config(tmp_path)
    run_dir = tmp_path / "runs" / "kill"
    killed = _run(config, FAULTS["save 4 renamed, 2 not deleted"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _damage(run_dir / "checkpoints" / "2")
    _damage(run_dir / "checkpoints" / "4")
    p = _run(config)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert lines[-1].startswith("jaxlora: error: no readable checkpoint: "), p.stderr
    assert "checkpoints/4" in lines[-1] and "checkpoints/2" in lines[-1]
    assert sum("skipping damaged checkpoint" in line for line in lines) == 2, p.stderr
    _assert_only_jaxlora_lines(p.stderr)
