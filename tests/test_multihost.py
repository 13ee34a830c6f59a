"""Multi-host on one machine: two processes on loopback (127.0.0.1, a free port), CPU backend,
4 simulated devices each, one mesh (data=2, fsdp=4) over all 8 (tests/multihost_child.py).

- Two hosts train 3 steps like one process with 8 devices fed the same global batches (host
  0's rows, then host 1's). Tolerance: losses 1e-5 relative; adapters 1e-5 relative plus 3e-6
  absolute (the summation orders of the sharded programs differ, as in
  tests/multidevice_checks.py).
- Killing one host ends the other with JAX's error (a heartbeat timeout of 5 s), not a hang.

Every subprocess has a timeout, and all of them are killed when a test ends, so nothing can
hang CI. Those tests are slow (about 90 s together on 2 cores: each process compiles the
steps); when the runtime starts is tested in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import write_tiny_config

from jaxlora import sharding
from jaxlora.errors import ConfigError
from jaxlora.sharding import ENV_VARS, ShardingSpec

TESTS = Path(__file__).parent
CHILD = str(TESTS / "multihost_child.py")
HOSTS, STEPS, HEARTBEAT_S = 2, 3, 5
TIMEOUT_S = 300  # per process; the runs themselves take well under a minute
RTOL = 1e-5


def _corpus(folder: Path, name: str, docs: int, words: int) -> Path:
    """`docs` JSONL text records of different lengths (so the hosts' shards differ)."""
    rng = np.random.default_rng(docs)
    vocab = "the quick brown fox jumps over a lazy dog that sleeps under tree".split()
    path = folder / f"{name}.jsonl"
    path.write_text("".join(
        json.dumps({"text": " ".join(rng.choice(vocab, words + 5 * i))}) + "\n"
        for i in range(docs)))
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("multihost")
    path = write_tiny_config(folder, "mh", steps=STEPS)
    train, val = _corpus(folder, "train", 11, 8), _corpus(folder, "val", 4, 20)
    return path, [
        f'data.sources=["{train}"]', f'data.validation_sources=["{val}"]',
        "data.batch_size=8", "data.shuffle=true", "train.log_every=1", "eval.batches=1",
        "eval.max_new_tokens=2", "sharding.mesh.data=2", "sharding.mesh.fsdp=4",
        f"sharding.heartbeat_timeout_s={HEARTBEAT_S}",
    ]


# --------------------------------------------------------------------------------------------
# When the runtime starts, and with what (no processes started)
# --------------------------------------------------------------------------------------------
def test_one_host_unless_the_config_or_the_environment_names_several():
    assert not sharding.named(ShardingSpec(), {})
    assert not sharding.named(ShardingSpec(num_processes=1), {"SLURM_NTASKS": "4"})
    assert sharding.named(ShardingSpec(num_processes=2), {})
    assert sharding.named(ShardingSpec(coordinator_address="auto"), {})
    for var in ENV_VARS:
        assert sharding.named(ShardingSpec(), {var: "1"})
    assert not sharding.initialize(ShardingSpec(), {})  # one host: nothing started


def test_the_config_wins_over_the_environment_and_gaps_are_left_to_jax():
    env = dict(zip(ENV_VARS, ["10.0.0.1:1234", "4", "3"], strict=True))
    assert sharding.distributed_args(ShardingSpec(), env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
        "heartbeat_timeout_seconds": 100}
    spec = ShardingSpec(coordinator_address="h:1", num_processes=2, process_id=0,
                        heartbeat_timeout_s=7)
    assert sharding.distributed_args(spec, env) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
        "heartbeat_timeout_seconds": 7}
    auto = sharding.distributed_args(ShardingSpec(coordinator_address="auto"), env)
    assert auto["coordinator_address"] is None  # detected by JAX (SLURM, TPU pod)
    assert auto["num_processes"] == 4
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='two': not an integer"):
        sharding.distributed_args(ShardingSpec(), {"JAX_NUM_PROCESSES": "two"})


def test_a_batch_the_processes_cannot_split_is_refused(monkeypatch):
    mesh = sharding.make_mesh(ShardingSpec(), jax.devices()[:1])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    sharding.check_batch(mesh, 4)
    with pytest.raises(ConfigError, match="data.batch_size: 3 rows cannot be split over 2 "
                                          "processes"):
        sharding.check_batch(mesh, 3)


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    cache = os.environ.get("JAXLORA_TEST_JAX_CACHE")  # conftest's compilation cache
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return {**env, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _hosts(config_path: Path, overrides: list[str], logs: Path):
    """Two host processes of one run (stderr to logs/host<p>.txt); killed on the way out."""
    port = _free_port()
    procs = []
    try:
        for p in range(HOSTS):
            env = _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(HOSTS), JAX_PROCESS_ID=str(p))
            with open(logs / f"host{p}.txt", "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, CHILD, "run", str(config_path), *overrides],
                    cwd=TESTS.parent, env=env, stdout=subprocess.DEVNULL, stderr=err))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def _wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"timed out after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_two_hosts_train_like_one_process_with_their_global_batches(config, tmp_path):
    path, overrides = config
    run_dir = tmp_path / "runs" / "mh"
    overrides = [*overrides, f"output_dir={tmp_path / 'runs'}"]
    with _hosts(path, overrides, tmp_path) as procs:
        rcs = [_wait(p, TIMEOUT_S, tmp_path / f"host{i}.txt") for i, p in enumerate(procs)]
    logs = [(tmp_path / f"host{i}.txt").read_text() for i in range(HOSTS)]
    assert rcs == [0, 0], "\n".join(x[-3000:] for x in logs)
    # process 0 logs and writes the run files; process 1 neither
    assert "2 process(es)" in logs[0] and "jaxlora:" not in logs[1]
    for name in ("config.toml", "metrics.jsonl", "summary.json", "loss.png", "samples.txt"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "3", "base.json"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0]

    out = tmp_path / "reference.json"
    ref = subprocess.run([sys.executable, CHILD, "reference", str(path), str(run_dir), str(out),
                          *overrides], cwd=TESTS.parent, env=_env(8), capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert ref.returncode == 0, ref.stderr[-4000:]
    want = json.loads(out.read_text())
    np.testing.assert_allclose(losses, want["losses"], rtol=RTOL)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["val_loss"] < summary["val_loss_before"]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker-killed", "coordinator-killed"])
def test_a_killed_host_ends_the_other_with_an_error_not_a_hang(config, tmp_path, victim):
    path, overrides = config
    run_dir = tmp_path / "runs" / "mh"
    overrides = [*overrides, f"output_dir={tmp_path / 'runs'}", "train.steps=100000",
                 "data.validation_sources=[]", "data.validation_fraction=0", "eval.samples=[]",
                 "checkpoint.every=0"]  # steps only: nothing else to compile
    with _hosts(path, overrides, tmp_path) as procs:
        deadline = time.monotonic() + TIMEOUT_S
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text()):  # a step is done
            assert all(p.poll() is None for p in procs), (tmp_path / "host0.txt").read_text()
            assert time.monotonic() < deadline, "no training step within the timeout"
            time.sleep(0.5)
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        survivor = 1 - victim
        rc = _wait(procs[survivor], 6 * HEARTBEAT_S + 30, tmp_path / f"host{survivor}.txt")
        waited = time.monotonic() - t0
    log = (tmp_path / f"host{survivor}.txt").read_text()
    assert rc != 0, log[-3000:]
    assert waited < 6 * HEARTBEAT_S + 30
    assert any(s in log for s in ("heartbeat", "another task died", "Connection closed")), log[-3000:]
