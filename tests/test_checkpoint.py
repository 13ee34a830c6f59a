"""jaxlora.checkpoint: round trip, retention, damaged-step fallback, base checks, size."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora.checkpoint import CheckpointManager, base_record, check_adapters_fit, fingerprint
from jaxlora.errors import CheckpointError
from jaxlora.lora import LoraPair


def Pair(a, b):  # noqa: N802
    return LoraPair(a, b, scale=2.0, dropout=0.0)


class State(NamedTuple):  # same fields as jaxlora.train.TrainState
    step: jax.Array
    adapters: Any
    opt_state: Any
    rng: jax.Array


def _base(seed: int = 0, out: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "embed": {"embedding": jnp.asarray(rng.standard_normal((32, 8), np.float32))},
        "layers": {
            "attn": {
                "q_proj": {"kernel": jnp.asarray(rng.standard_normal((2, 8, out), np.float32))}
            }
        },
    }


def _state(seed: int = 0, r: int = 4, out: int = 16) -> State:
    """A TrainState with random values everywhere (numpy: no XLA compiles in these tests)."""
    rng = np.random.default_rng(seed)
    rnd = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    adapters = {"layers": {"attn": {"q_proj": {"kernel": Pair(rnd(2, 8, r), rnd(2, r, out))}}}}
    opt_state = optax.adamw(1e-3).init(adapters)
    leaves, treedef = jax.tree.flatten(opt_state)
    leaves = [jnp.asarray(seed + 3, x.dtype) if x.ndim == 0 else rnd(*x.shape) for x in leaves]
    rng_key = jnp.asarray(rng.integers(0, 2**32 - 1, (2,), dtype=np.uint32))
    return State(
        jnp.asarray(seed, jnp.int32), adapters, jax.tree.unflatten(treedef, leaves), rng_key
    )


def _assert_equal(x: Any, y: Any) -> None:
    lx, tx = jax.tree.flatten(x)
    ly, ty = jax.tree.flatten(y)
    assert tx == ty
    for a, b in zip(lx, ly, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_round_trip_bit_exact(tmp_path: Path) -> None:
    rec = base_record(_base(), name="tiny", quant={"qtype": "nf4"})
    state = _state(7)
    with CheckpointManager(tmp_path, save_every=1, base=rec) as ckpt:
        assert ckpt.save(
            7, state, data_position={"epoch": 1, "index": 42}, metrics={"val_loss": 1.5}
        )
    got = CheckpointManager(tmp_path, base=rec).restore(_state(0), base=_base())
    assert got.step == 7
    assert got.data_position == {"epoch": 1, "index": 42}
    assert got.metrics == {"val_loss": 1.5}
    _assert_equal(got.state, state)
    assert isinstance(got.state, State)
    assert (tmp_path / "checkpoints" / "base.json").exists()


def test_save_every_and_async_wait(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, save_every=5, keep=10) as ckpt:
        started = [ckpt.save(s, _state(s)) for s in range(1, 12)]
        assert started == [s % 5 == 0 for s in range(1, 12)]
        ckpt.save(11, _state(11), force=True)  # the final step
        ckpt.wait()
        assert ckpt.all_steps() == [5, 10, 11]


def test_keep_last_k_and_best(tmp_path: Path) -> None:
    losses = {1: 3.0, 2: 0.5, 3: 2.0, 4: 2.5, 5: 2.2, 6: 2.4}
    with CheckpointManager(tmp_path, keep=2, keep_best=1, best_metric="val_loss") as ckpt:
        for s, v in losses.items():
            ckpt.save(s, _state(s), metrics={"val_loss": v})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 5, 6]  # best (0.5 at step 2) + the last two
        assert ckpt.best_step() == 2
    got = CheckpointManager(tmp_path).restore(_state(0), step=2)
    _assert_equal(got.state, _state(2))


def test_best_mode_max(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep=1, best_metric="acc", best_mode="max") as ckpt:
        for s, v in {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3}.items():
            ckpt.save(s, _state(s), metrics={"acc": v})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]


@pytest.mark.parametrize("damage", ["delete_files", "truncate_files", "tmp_dir"])
def test_damaged_newest_falls_back(tmp_path: Path, damage: str) -> None:
    with CheckpointManager(tmp_path, keep=5) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.save(2, _state(2))
    root = tmp_path / "checkpoints"
    if damage == "tmp_dir":
        # an interrupted save: Orbax's temporary directory is never listed as a step
        shutil.copytree(root / "2", root / "3.orbax-checkpoint-tmp-123")
        expect = 2
    else:
        shutil.copytree(root / "2", root / "3")
        files = [
            p for p in (root / "3" / "state").rglob("*") if p.is_file() and p.stat().st_size > 0
        ]
        assert files
        for p in files:
            if damage == "delete_files":
                p.unlink()
            else:
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        expect = 2
    mgr = CheckpointManager(tmp_path)
    if damage == "tmp_dir":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = mgr.restore(_state(0))
    else:
        with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
            got = mgr.restore(_state(0))
        with pytest.raises(CheckpointError):
            mgr.restore(_state(0), step=3)  # asking for the damaged step explicitly
    assert got.step == expect
    _assert_equal(got.state, _state(2))


# Orbax's background asyncio loop may report "Event loop is closed" after the failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_bytes_detected_by_checksum(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
    # flip bytes in the biggest data file: either the reader or the crc32 must catch it.
    # Orbax may keep two files of that size (the OCDBT process file and the merged one),
    # and which one is read can vary: flip them all.
    files = [p for p in (tmp_path / "checkpoints" / "1" / "state").rglob("*") if p.is_file()]
    biggest = max(p.stat().st_size for p in files)
    for f in (p for p in files if p.stat().st_size == biggest):
        data = bytearray(f.read_bytes())
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 64)):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
    with CheckpointManager(tmp_path) as mgr, pytest.raises(CheckpointError):
        mgr.restore(_state(0), step=1)


def test_no_checkpoint_and_template_mismatch(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        CheckpointManager(tmp_path).restore(_state(0))
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, _state(1, r=4))
        assert not ckpt.save(1, _state(5, r=4), force=True)  # a step is written once
    assert not CheckpointManager(tmp_path).save(1, _state(5, r=4), force=True)
    _assert_equal(CheckpointManager(tmp_path).restore(_state(0)).state, _state(1))
    with pytest.raises(CheckpointError, match=r"q_proj/kernel/a.*\[2, 8, 4\].*\[2, 8, 8\]"):
        CheckpointManager(tmp_path).restore(_state(0, r=8))


def test_base_fingerprint_mismatch(tmp_path: Path) -> None:
    rec = base_record(_base(0), name="tiny")
    with CheckpointManager(tmp_path, base=rec) as ckpt:
        ckpt.save(1, _state(1))
    before = (tmp_path / "checkpoints" / "base.json").read_text()
    # same shapes, different weights
    with pytest.raises(CheckpointError, match="weights differ"):
        CheckpointManager(tmp_path, base=base_record(_base(1), name="tiny"))
    # different shapes: the message names the leaf
    with pytest.raises(CheckpointError, match=r"q_proj/kernel.*\[2, 8, 16\].*\[2, 8, 24\]"):
        CheckpointManager(tmp_path, base=base_record(_base(0, out=24), name="tiny"))
    with pytest.raises(CheckpointError, match="name 'tiny' vs 'other'"):
        CheckpointManager(tmp_path, base=base_record(_base(0), name="other"))
    # nothing was overwritten
    assert (tmp_path / "checkpoints" / "base.json").read_text() == before
    # adapters that do not fit the given base
    with pytest.raises(CheckpointError, match="does not fit the base"):
        CheckpointManager(tmp_path, base=rec).restore(_state(0), base=_base(0, out=24))


def test_fingerprint_is_content_sensitive() -> None:
    b = _base(0)
    assert fingerprint(b) == fingerprint(_base(0))
    b2 = jax.tree.map(lambda x: x, b)
    b2["embed"]["embedding"] = b2["embed"]["embedding"].at[3, 3].add(1e-6)
    assert fingerprint(b2) != fingerprint(b)
    assert fingerprint(b2, include_bytes=False) == fingerprint(b, include_bytes=False)
    check_adapters_fit(b, _state(0).adapters)


def test_smollm2_adapter_checkpoint_is_megabytes(tmp_path: Path) -> None:
    L, d, ffn, r, kv = 30, 576, 1536, 16, 192  # SmolLM2-135M: 3 KV heads x 64
    shapes = {
        ("attn", "q_proj"): (d, d),
        ("attn", "k_proj"): (d, kv),
        ("attn", "v_proj"): (d, kv),
        ("attn", "o_proj"): (d, d),
        ("mlp", "gate_proj"): (d, ffn),
        ("mlp", "up_proj"): (d, ffn),
        ("mlp", "down_proj"): (ffn, d),
    }
    # random adapters (zeros would compress to nothing and prove little); fresh optimizer
    # state (Adam moments are zeros at step 0)
    rng = np.random.default_rng(0)
    rnd = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    adapters: dict = {"layers": {"attn": {}, "mlp": {}}}
    for (blk, name), (i, o) in shapes.items():
        adapters["layers"][blk][name] = {"kernel": Pair(rnd(L, i, r), rnd(L, r, o))}
    opt_state = optax.adamw(1e-4).init(adapters)
    state = State(
        jnp.asarray(0, jnp.int32), adapters, opt_state, jax.random.key_data(jax.random.key(0))
    )
    nbytes = lambda t: sum(np.asarray(x).nbytes for x in jax.tree.leaves(t))  # noqa: E731
    adapter_bytes, opt_bytes = nbytes(adapters), nbytes(opt_state)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, state)
    disk = sum(p.stat().st_size for p in (tmp_path / "checkpoints").rglob("*") if p.is_file())
    assert 2e6 < adapter_bytes < 2e7  # ~4.9M params -> ~19.5 MB float32
    # the adapters are really stored (Orbax zstd-compresses random floats by ~8%), once
    assert 0.8 * adapter_bytes < disk < 2.5 * adapter_bytes + opt_bytes
    assert disk < 135e6 * 4 / 5  # far below the 135M-param base (540 MB in float32)


def test_restore_adapters_only(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep=1) as ckpt:
        for s, v in {1: 0.2, 2: 0.9, 3: 0.7}.items():
            ckpt.save(s, _state(s), metrics={"val_loss": v})
    template = jax.eval_shape(lambda: _state(0).adapters)  # shapes + static scales only
    mgr = CheckpointManager(tmp_path)
    best = mgr.restore_adapters(template, step="best")
    assert best.step == 1
    _assert_equal(best.state, _state(1).adapters)
    latest = mgr.restore_adapters(template)
    assert latest.step == 3
    _assert_equal(latest.state, _state(3).adapters)
    with pytest.raises(CheckpointError, match=r"\[2, 8, 4\].*\[2, 8, 2\]"):
        mgr.restore_adapters(jax.eval_shape(lambda: _state(0, r=2).adapters))


def test_keep_best_ranks_steps_without_the_metric_last(tmp_path: Path, capfd) -> None:
    losses = {1: 0.3, 2: None, 3: 0.1, 4: None, 5: 0.2, 6: None}
    with CheckpointManager(tmp_path, keep=1, keep_best=2) as ckpt:
        for s, v in losses.items():
            ckpt.save(s, _state(s), metrics={} if v is None else {"val_loss": v, "loss": 1.0})
        ckpt.wait()
        # the newest (6), and the two best of the steps that have a val_loss (3, 5)
        assert ckpt.all_steps() == [3, 5, 6]
        assert ckpt.best_step() == 3
    assert "tracked_metric" not in capfd.readouterr().err  # Orbax gets metrics on every save
    got = CheckpointManager(tmp_path).restore(_state(0), step=5)
    assert got.metrics == {"val_loss": 0.2, "loss": 1.0}
    with pytest.raises(ValueError, match="keep_best"):
        CheckpointManager(tmp_path, keep_best=-1)


def test_best_step_none_without_the_metric(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, _state(1), metrics={"loss": 2.0})
        assert ckpt.best_step() is None
    template = jax.eval_shape(lambda: _state(0).adapters)
    with pytest.raises(CheckpointError, match="no checkpoint with a 'val_loss' metric"):
        CheckpointManager(tmp_path).restore_adapters(template, step="best")


def test_damaged_step_is_dropped_by_the_next_save_only(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep=2) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, _state(s), metrics={"val_loss": 1.0 / s})
    step3 = tmp_path / "checkpoints" / "3" / "state"
    for p in (p for p in step3.rglob("*") if p.is_file() and p.stat().st_size > 0):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    mgr = CheckpointManager(tmp_path, keep=2)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert mgr.restore(_state(0)).step == 2
    assert mgr.all_steps() == [2, 3]  # restoring deleted nothing
    assert mgr.save(3, _state(13))  # the damaged step is written again
    mgr.close()
    mgr = CheckpointManager(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = mgr.restore(_state(0))
    assert got.step == 3 and mgr.all_steps() == [2, 3]
    _assert_equal(got.state, _state(13))


def test_damaged_metrics_file_does_not_block_the_directory(tmp_path: Path) -> None:
    import orbax.checkpoint as ocp

    with CheckpointManager(tmp_path, keep=5) as ckpt:
        ckpt.save(1, _state(1), metrics={"val_loss": 0.5})
        ckpt.save(2, _state(2), metrics={"val_loss": 0.1})
    metrics_files = [p for p in (tmp_path / "checkpoints" / "2").rglob("*") if p.name == "metrics"]
    metrics_files = [p for p in metrics_files if p.is_file()]
    assert len(metrics_files) == 1
    metrics_files[0].write_text('{"val_lo')
    # control: Orbax alone cannot even list this directory
    with pytest.raises(ValueError):
        ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "data", "meta"))
    mgr = CheckpointManager(tmp_path)
    assert mgr.all_steps() == [1, 2]
    assert mgr.best_step() == 1  # step 2's ranking metric is unreadable
    got = mgr.restore(_state(0))  # its own metadata is intact: restored with its metrics
    assert got.step == 2 and got.metrics == {"val_loss": 0.1}
    _assert_equal(got.state, _state(2))
