"""jaxlora.sharding: mesh sizes and rules in this process; the multi-device checks in a child
process that XLA gives 8 simulated CPU devices (tests/multidevice_checks.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxlora import quant, sharding
from jaxlora.errors import ConfigError

TESTS = Path(__file__).parent


def test_on_eight_simulated_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         str(TESTS / "multidevice_checks.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 12 and "failed" not in out.stdout, tail


def test_one_device_mesh_and_rules():
    mesh = sharding.make_mesh(sharding.ShardingSpec(), jax.devices()[:1])
    assert dict(mesh.shape) == {"members": 1, "data": 1, "fsdp": 1, "tensor": 1}
    base = {"layers": {"attn": {"q_proj": {"kernel": quant.quantize(
        jax.numpy.ones((2, 64, 64)), "nf4", batch_dims=1)}}},
        "embed": {"embedding": jax.numpy.ones((10, 64))}}
    sh = sharding.base_shardings(mesh, base)
    q = sh["layers"]["attn"]["q_proj"]["kernel"]
    assert q.codes.spec == jax.sharding.PartitionSpec(None, ("fsdp", "tensor"))
    assert q.absmax.spec == q.codes.spec
    assert sharding.device_bytes(base, sh) == sum(x.nbytes for x in jax.tree.leaves(base))


@pytest.mark.parametrize("rows,ok", [(8, True), (6, False)])
def test_batch_rows_must_split_over_the_batch_axes(rows, ok):
    devices = jax.devices()[:1] * 4  # shapes only: a mesh object of 4 "devices"
    mesh = jax.sharding.Mesh(
        __import__("numpy").asarray(devices, dtype=object).reshape(1, 2, 2, 1), sharding.AXES)
    if ok:
        sharding.check_batch(mesh, rows)
    else:
        with pytest.raises(ConfigError, match="data.batch_size: 6 rows .* 2 x 2 = 4"):
            sharding.check_batch(mesh, rows)


def test_compute_dtype_auto_is_bfloat16_on_accelerators_only(monkeypatch):
    from jaxlora.train import assemble as runs

    assert runs.compute_dtype("auto") == jax.numpy.float32  # this machine: CPU
    assert runs.compute_dtype("bfloat16") == jax.numpy.bfloat16
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert runs.compute_dtype("auto") == jax.numpy.bfloat16
        assert runs.compute_dtype("float32") == jax.numpy.float32
