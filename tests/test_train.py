"""jaxlora.train: the jitted adapters-only step and the run loop, on the random tiny models.

Compiles are the cost here, so the step functions are built once per module (float and nf4
bases, both from the shared tiny config of conftest.py) and reused by every test; batches
keep the config's shape [accum, 2, 32] so most tests hit the same compiled program.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_tiny_config

from jaxlora import data as data_lib
from jaxlora import lora, models, optim, quant, train
from jaxlora.config import load_config
from jaxlora.errors import ConfigError, DataError

B, T = 2, 32  # the shared tiny config's batch_size and seq_len
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Helpers and module-scoped compiled steps
# --------------------------------------------------------------------------------------------
class Kit:
    """A base, fresh adapters, optimizer and the compiled step of one tiny config."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.loaded = train.load_base(cfg)
        self.mcfg, self.base, self.tok = self.loaded.config, self.loaded.base, self.loaded.tokenizer
        self.spec = cfg.lora
        self.tx = optim.make_optimizer(cfg.optim, total_steps=cfg.train.steps)
        self.adapters = lora.init(jax.random.key(cfg.train.seed), self.base, self.spec)
        self.step = train.make_train_step(self.mcfg, self.tx, dropout=False)

    def state(self, adapters=None):
        """A fresh TrainState owning its own buffers (the step donates its state)."""
        return train.init_state(
            copy_tree(adapters if adapters is not None else self.adapters),
            self.tx,
            self.cfg.train.seed,
        )


def copy_tree(tree):
    return jax.tree.map(lambda x: jnp.array(np.asarray(x)), tree)


def leaf_bytes(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def perturbed(adapters, seed: int = 0, scale: float = 0.05):
    """Adapters with every a and b entry nudged (B = 0 at init leaves A without gradient)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype),
        adapters,
    )


def text_batch(tok, text: str, rows: int = B, seq: int = T) -> data_lib.Batch:
    """Rows cut from `text` tokens: loss on every token, one segment per row."""
    ids = np.asarray(tok.encode(text), np.int32)
    assert len(ids) >= rows * seq + 1
    inp = np.stack([ids[r * seq : r * seq + seq] for r in range(rows)])
    tgt = np.stack([ids[r * seq + 1 : r * seq + seq + 1] for r in range(rows)])
    return data_lib.Batch(
        inp,
        tgt,
        np.ones(inp.shape, np.float32),
        np.ones(inp.shape, np.int32),
        np.broadcast_to(np.arange(seq, dtype=np.int32), inp.shape).copy(),
    )


def stacked(*batches: data_lib.Batch) -> data_lib.Batch:
    """[accum, B, T] device arrays, as the run loop feeds the step."""
    return data_lib.Batch(*(jnp.asarray(np.stack(xs)) for xs in zip(*batches, strict=True)))


CORPUS = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness. "
)


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def qkit(cfg_path) -> Kit:
    """nf4 base (the shared config as is)."""
    return Kit(load_config(cfg_path))


@pytest.fixture(scope="module")
def fkit(cfg_path) -> Kit:
    """float32 base; plain SGD without clipping, so one step's update is -lr x the gradient
    (Adam's g / (|g| + eps) would amplify float summation noise of near-zero entries)."""
    return Kit(
        load_config(
            cfg_path,
            ["quant.qtype=none", "optim.max_grad_norm=0", 'optim.name="sgd"', "optim.b1=0.0"],
        )
    )


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------
def test_tiny_model_overfits_a_repeated_text(cfg_path):
    """QLoRA on a nf4 base: 40 steps on one batch of a repeated sentence at lr 1e-2 cut the
    loss from ln(vocab) ~ 5.6 (random model) to a fraction of it (measured: ~0.1).

    The embedding (= the tied LM head) is adapted too: with the kernels alone the frozen
    final norm and the 0.02-scale random head cap every logit near +-1.3, so no adapter on
    the kernels can take the loss below ~4.3 on this random model.
    """
    kit = Kit(load_config(cfg_path, ['lora.targets="(kernel|embedding)$"']))
    assert "embed/embedding" in lora.flatten_paths(kit.adapters)
    batch = stacked(text_batch(kit.tok, "hello world! " * 10))
    state = kit.state()
    losses = []
    for _ in range(40):
        state, m = kit.step(state, kit.base, batch)
        assert bool(m.finite)
        losses.append(float(m.loss))
    assert losses[0] > 5.0
    assert max(losses[-3:]) < 0.3 * losses[0], losses[::5]
    assert int(state.step) == 40
    assert float(m.tokens) == B * T


@pytest.mark.parametrize("which", ["float", "nf4"])
def test_base_is_bit_identical_after_training(which, fkit, qkit):
    kit = fkit if which == "float" else qkit
    if which == "nf4":  # the projections really are QTensors, and floats remain (norms, embed)
        kinds = {
            type(x).__name__
            for x in jax.tree.leaves(kit.base, is_leaf=lambda x: isinstance(x, quant.QTensor))
        }
        assert kinds == {"QTensor", "ArrayImpl"}, kinds
    before = leaf_bytes(kit.base)
    batch = stacked(text_batch(kit.tok, CORPUS))
    state = kit.state(perturbed(kit.adapters))
    a0 = leaf_bytes(state.adapters)
    for _ in range(3):
        state, m = kit.step(state, kit.base, batch)
        assert bool(m.finite)
    assert leaf_bytes(kit.base) == before
    assert leaf_bytes(state.adapters) != a0  # while the adapters did train


def test_loss_mask_zero_targets_change_nothing(fkit):
    """Targets where loss_mask == 0 (prompt tokens) contribute neither loss nor gradient."""
    b = text_batch(fkit.tok, CORPUS)
    mask = np.ones((B, T), np.float32)
    mask[:, :12] = 0.0  # a "prompt" per row
    mask[1, 20:25] = 0.0
    other = b.targets.copy()
    rng = np.random.default_rng(1)
    other[mask == 0] = rng.integers(3, fkit.mcfg.vocab_size, int((mask == 0).sum()))
    assert (other != b.targets).sum() > 20
    adapters = perturbed(fkit.adapters, seed=2)

    @jax.jit
    def loss_grad(adapters, batch):
        f = functools.partial(train.loss_and_count, base=fkit.base, batch=batch, mcfg=fkit.mcfg)
        (loss, count), g = jax.value_and_grad(lambda a: f(a), has_aux=True)(adapters)
        return loss, count, g

    l1, c1, g1 = loss_grad(adapters, b._replace(loss_mask=mask))
    l2, c2, g2 = loss_grad(adapters, b._replace(loss_mask=mask, targets=other))
    l3, _, g3 = loss_grad(adapters, b._replace(loss_mask=np.ones_like(mask), targets=other))
    assert float(c1) == float(c2) == mask.sum()
    assert float(l1) == float(l2)
    assert leaf_bytes(g1) == leaf_bytes(g2)
    assert abs(float(l3) - float(l1)) > 1.0  # the masked targets would have mattered
    assert leaf_bytes(g3) != leaf_bytes(g1)


def test_packed_documents_equal_separate_documents(fkit):
    """[doc1 | doc2] in one row (segment ids 1, 2; positions restarting) has the summed
    token loss of each document run alone."""
    tok = fkit.tok
    d1 = np.asarray(tok.encode("Packing puts two documents in a row.") + [tok.eos_id], np.int32)
    d2 = np.asarray(tok.encode("Segment ids keep them apart.") + [tok.eos_id], np.int32)
    adapters = perturbed(fkit.adapters, seed=3)

    def row(pieces):
        """One [1, T] row: the pieces back to back (inputs/targets within each), then padding."""
        inp, tgt, m, seg, pos = (np.zeros(T, np.int32) for _ in range(5))
        m = m.astype(np.float32)
        o = 0
        for sid, d in pieces:
            k = len(d) - 1
            inp[o : o + k], tgt[o : o + k] = d[:-1], d[1:]
            m[o : o + k], seg[o : o + k], pos[o : o + k] = 1.0, sid, np.arange(k)
            o += k
        assert o <= T
        return data_lib.Batch(*(x[None] for x in (inp, tgt, m, seg, pos)))

    ev = jax.jit(functools.partial(train.loss_and_count, base=fkit.base, mcfg=fkit.mcfg, chunk=7))
    d1s, d2s = d1[: T // 2 + 1], d2[: T // 2 - 1]
    packed = ev(adapters, batch=row([(1, d1s), (2, d2s)]))
    alone1 = ev(adapters, batch=row([(1, d1s)]))
    alone2 = ev(adapters, batch=row([(1, d2s)]))
    assert float(packed[1]) == float(alone1[1]) + float(alone2[1]) == len(d1s) + len(d2s) - 2
    np.testing.assert_allclose(float(packed[0]), float(alone1[0]) + float(alone2[0]), rtol=2e-6)
    # and without segment ids the second document would see the first: the loss differs
    leaky = row([(1, d1s), (2, d2s)])
    leaky = leaky._replace(segment_ids=np.ones_like(leaky.segment_ids))
    assert abs(float(ev(adapters, batch=leaky)[0]) - float(packed[0])) > 1e-3


def test_gradient_accumulation_equals_full_batch(fkit):
    rows = text_batch(fkit.tok, CORPUS, rows=2 * B)  # [2B, T] distinct rows
    rows = rows._replace(
        loss_mask=np.where(np.arange(T) < 5 * np.arange(1, 2 * B + 1)[:, None], 0.0, 1.0).astype(
            np.float32
        )
    )  # uneven counts
    half = [data_lib.Batch(*(x[i * B : (i + 1) * B] for x in rows)) for i in range(2)]
    adapters = perturbed(fkit.adapters, seed=4)
    # full batch: [1, 2B, T] -- and the same rows as two micro-batches [2, B, T]
    s_full, m_full = fkit.step(fkit.state(adapters), fkit.base, stacked(rows))
    s_acc, m_acc = fkit.step(fkit.state(adapters), fkit.base, stacked(*half))
    assert float(m_full.tokens) == float(m_acc.tokens) == rows.loss_mask.sum()
    np.testing.assert_allclose(float(m_acc.loss), float(m_full.loss), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc.grad_norm), float(m_full.grad_norm), rtol=1e-5)
    full, acc, orig = (jax.tree.leaves(x) for x in (s_full.adapters, s_acc.adapters, adapters))
    for f, a, o in zip(full, acc, orig, strict=True):
        f, a, o = np.asarray(f), np.asarray(a), np.asarray(o)
        np.testing.assert_allclose(a, f, rtol=1e-6, atol=1e-8)
        # the updates themselves (-lr x gradient) agree to float32 summation noise
        np.testing.assert_allclose(a - o, f - o, rtol=1e-4, atol=1e-4 * np.abs(f - o).max())
        assert np.abs(f - o).max() > 1e-5  # a real update happened


@pytest.mark.parametrize("differentiable", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 13, 26, 256])
def test_chunked_xent_matches_float64_reference(fkit, chunk, differentiable):
    """Masked token cross-entropy, summed; N = 2 x 13 tokens (chunk 5 does not divide it).
    The training path (gradient formed in the forward) and the evaluation path agree."""
    rng = np.random.default_rng(5)
    d, v = fkit.mcfg.hidden_size, fkit.mcfg.vocab_size
    hidden = rng.standard_normal((2, 13, d)).astype(np.float32)
    targets = rng.integers(0, v, (2, 13)).astype(np.int32)
    mask = (rng.random((2, 13)) < 0.7).astype(np.float32)
    total, count = jax.jit(train.chunked_xent, static_argnums=(0, 6, 7))(
        fkit.mcfg, fkit.base, None, hidden, targets, mask, chunk, differentiable
    )
    logits = np.asarray(models.logits(fkit.mcfg, fkit.base, jnp.asarray(hidden)), np.float64)
    mx = logits.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[..., 0]
    gold = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    ref = float(((lse - gold) * mask).sum())
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)


@pytest.mark.parametrize("chunk", [5, 26])
def test_chunked_xent_gradient_equals_autodiff_of_the_plain_loss(cfg_path, chunk):
    """The xent pulls each chunk's gradient back in the forward pass (no logits kept for the
    backward). Its gradient with respect to the hidden states and to adapters on the tied
    embedding / LM head equals plain autodiff of the unchunked loss, in float64 math."""
    kit = Kit(load_config(cfg_path, ["quant.qtype=none", 'lora.targets="(kernel|embedding)$"']))
    ad = {"embed": perturbed(kit.adapters)["embed"]}
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.standard_normal((2, 13, kit.mcfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, kit.mcfg.vocab_size, (2, 13)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 13)) < 0.7, jnp.float32)

    def chunked(h, a):
        return train.chunked_xent(kit.mcfg, kit.base, a, h, targets, mask, chunk)[0]

    def plain(base, h, a):
        logits = models.logits(kit.mcfg, base, h, a)
        gold = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, -1) - gold) * mask)

    with jax.enable_x64():
        to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
        ref_val, ref = jax.value_and_grad(functools.partial(plain, to64(kit.base)),
                                          argnums=(0, 1))(to64(hidden), to64(ad))
    val, got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, ad)
    np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert np.abs(np.asarray(r)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4,
                                   atol=1e-5 * np.abs(np.asarray(r)).max())


def _poison_base(base):
    """The base with one NaN in a float (unquantized) leaf: the final norm's scale."""
    flat = lora.flatten_paths(base)
    path = next(p for p, x in flat.items() if "norm" in p and not p.startswith("layers/"))
    x = np.asarray(flat[path]).copy()
    x.flat[3] = np.nan
    return lora.unflatten_paths({**flat, path: jnp.asarray(x)})


@pytest.mark.parametrize("poison", ["nan-in-nf4-base-float-leaf", "inf-in-adapters"])
def test_nan_guard_keeps_state(poison, fkit, qkit):
    kit = qkit if poison.startswith("nan") else fkit
    batch = stacked(text_batch(kit.tok, CORPUS))
    # one good step first, so the optimizer state is not trivially zero
    state, m = kit.step(kit.state(perturbed(kit.adapters)), kit.base, batch)
    assert bool(m.finite)
    base = kit.base
    if poison.startswith("nan"):
        base = _poison_base(kit.base)
    else:
        leaves, tdef = jax.tree.flatten(state.adapters)
        bad = np.asarray(leaves[1]).copy()
        bad.flat[0] = np.inf
        leaves[1] = jnp.asarray(bad)
        state = state._replace(adapters=jax.tree.unflatten(tdef, leaves))
    before = leaf_bytes(state)
    new, m = kit.step(state, base, batch)
    assert not bool(m.finite)
    assert not (np.isfinite(float(m.loss)) and np.isfinite(float(m.grad_norm)))
    assert leaf_bytes(new) == before  # step, adapters, optimizer state, rng: all unchanged


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_run_end_to_end_resume_and_refuse(tiny_config):
    path = tiny_config("e2e", steps=4)
    cfg = load_config(path)
    summary = train.run(cfg)
    run_dir = cfg.run_dir
    assert (run_dir / "config.toml").is_file()
    assert load_config(run_dir / "config.toml") == cfg
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all("step" in r and ("loss" in r or "val_loss" in r) for r in records)
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert all(np.isfinite(r.get("loss", r.get("val_loss"))) for r in records)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["val_loss_before"] == records[0]["val_loss"]
    assert s["val_loss"] == records[-1]["val_loss"]
    assert s["val_loss"] < s["val_loss_before"]  # lr 1e-2 on a related text: it learns
    assert s["steps"] == 4 and s["qtype"] == "nf4"
    assert summary["val_loss"] == s["val_loss"]
    png = (run_dir / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == ["2", "4"]
    samples = (run_dir / "samples.txt").read_text()
    assert "### prompt\nthe" in samples and "### with adapters" in samples
    opened = train.open_run(run_dir)
    assert opened.step == 4
    assert not all(
        np.all(np.asarray(p.b) == 0) for p in lora.flatten_paths(opened.adapters).values()
    )

    # the same config again: nothing retrained, nothing rewritten
    files = _snapshot(run_dir)
    again = train.run(load_config(path))
    assert _snapshot(run_dir) == files
    assert again["val_loss"] == s["val_loss"] and again["wall_s"] == s["wall_s"]
    # ... also when only the progress bar is toggled: that is not another run
    cfg = load_config(path)
    toggled = load_config(path, [f"train.progress={'false' if cfg.train.progress else 'true'}"])
    assert train.run(toggled)["wall_s"] == s["wall_s"]
    assert _snapshot(run_dir) == files

    # a different config in the same run directory: refused, nothing touched
    with pytest.raises(ConfigError, match="different"):
        train.run(load_config(path, ["optim.lr=0.02"]))
    assert _snapshot(run_dir) == files


def test_run_stops_on_non_finite_loss_and_keeps_last_good_adapters(tmp_path, monkeypatch):
    """A batch whose step goes non-finite (a NaN in the base, injected for the batches that
    hold a '~') stops the run with NonFiniteError; the saved adapters are the last good ones."""
    (tmp_path / "a.txt").write_text(CORPUS[:150])  # stream tokens 0-150: batches 0-1 clean
    (tmp_path / "b.txt").write_text("~" * 80)
    path = write_tiny_config(tmp_path, "nan", steps=6)
    cfg = load_config(
        path,
        [
            f'data.sources=["{tmp_path}/a.txt", "{tmp_path}/b.txt"]',
            "data.validation_sources=[]",
            "data.validation_fraction=0.0",
            "eval.samples=[]",
            "checkpoint.every=1",
        ],
    )
    tilde = train.load_base(cfg).tokenizer.encode("~")[0]
    real = train.compile_step
    good: list[list[np.ndarray]] = []

    def compile_step(*args):
        step = real(*args)

        def wrapped(state, base, batches):
            if bool(jnp.any(batches.inputs == tilde)):
                base = _poison_base(base)
            new, m = step(state, base, batches)
            if bool(m.finite):
                good.append([np.asarray(x) for x in jax.tree.leaves(new.adapters)])
            return new, m

        return wrapped

    monkeypatch.setattr(train.loop, "compile_step", compile_step)
    with pytest.raises(train.NonFiniteError, match="step 3: non-finite") as exc:
        train.run(cfg)
    assert "last good adapters saved at step 2" in str(exc.value)
    assert len(good) == 2
    monkeypatch.setattr(train.loop, "compile_step", real)
    opened = train.open_run(cfg.run_dir)
    assert opened.step == 2
    saved = [np.asarray(x) for x in jax.tree.leaves(opened.adapters)]
    assert all(np.array_equal(a, b) for a, b in zip(saved, good[-1], strict=True))
    assert not (cfg.run_dir / "summary.json").exists()


# --------------------------------------------------------------------------------------------
# Bad input: one clear error each
# --------------------------------------------------------------------------------------------
def _cfg(tmp_path: Path, *overrides: str):
    return load_config(write_tiny_config(tmp_path, "bad"), list(overrides))


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg = _cfg(tmp_path, f'data.sources=["{tmp_path}/empty.txt"]')
    with pytest.raises(DataError, match="training dataset is empty"):
        train.run(cfg)


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(DataError, match="nope.txt.*no such file"):
        train.run(_cfg(tmp_path, f'data.sources=["{tmp_path}/nope.txt"]'))
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(DataError, match="dangling.txt"):
        train.run(_cfg(tmp_path / "2", f'data.sources=["{tmp_path}/dangling.txt"]'))
    with pytest.raises(DataError, match="glob matches no files"):
        train.run(_cfg(tmp_path / "3", f'data.sources=["{tmp_path}/*.none"]'))


def test_invalid_utf8_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text(CORPUS)
    (tmp_path / "bad.txt").write_bytes(b"fine start \xff\xfe broken")
    loaded = train.load_base(_cfg(tmp_path))
    dcfg = data_lib.DataConfig(
        sources=(str(tmp_path / "good.txt"), str(tmp_path / "bad.txt")), seq_len=T, batch_size=B,
        validation_fraction=0.0,
    )
    ds = data_lib.load_datasets(dcfg, loaded.tokenizer, max_positions=512)
    assert ds.train.stats.skipped_files == 1
    assert ds.train.stats.files == 1 and ds.train.files == (str(tmp_path / "good.txt"),)
    # only invalid files: an empty dataset that says why
    with pytest.raises(DataError, match="1 files skipped for invalid UTF-8"):
        train.run(_cfg(tmp_path / "2", f'data.sources=["{tmp_path}/bad.txt"]'))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "recs.jsonl"
    p.write_text('{"text": "ok"}\n\n{"prompt": "a", "completion": "b"}\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"recs\.jsonl:4: malformed JSON"):
        train.run(_cfg(tmp_path, f'data.sources=["{p}"]'))


def test_seq_len_above_context_and_zero_batch(tmp_path):
    with pytest.raises(DataError, match="seq_len = 1024 exceeds the model's context of 512"):
        train.run(_cfg(tmp_path, "data.seq_len=1024"))
    with pytest.raises(ConfigError, match="data.batch_size: must be >= 1, got 0"):
        _cfg(tmp_path / "2", "data.batch_size=0")


def test_rejected_data_leaves_no_run_directory(tmp_path):
    """A run that fails on its data before training must not leave a config.toml behind:
    it would make the corrected config (same name) fail with 'holds a different run'."""
    bad = _cfg(tmp_path, "data.seq_len=1024")
    with pytest.raises(DataError):
        train.run(bad)
    assert not bad.run_dir.exists(), sorted(p.name for p in bad.run_dir.iterdir())


def _tensorboard_scalars(folder: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the scalar events in `folder`'s event files (TFRecord framing:
    length u64, crc u32, an Event proto, crc u32)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_tensorboard_events_hold_every_metrics_record(tiny_config):
    """`train.tensorboard = true`: each number of each metrics.jsonl record is a scalar of the
    same tag and step (float32), and nothing else is; off by default (no folder)."""
    cfg = load_config(tiny_config("tb", steps=4), ["train.tensorboard=true"])
    train.run(cfg)
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    want = {(k, r["step"]): v for r in records for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    got = _tensorboard_scalars(cfg.run_dir / "tensorboard")
    assert got.keys() == want.keys() and ("val_loss", 0) in got and ("loss", 4) in got
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    plain = load_config(tiny_config("plain", steps=2))
    train.run(plain)
    assert not (plain.run_dir / "tensorboard").exists()
