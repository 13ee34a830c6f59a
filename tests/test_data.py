"""Tests for jaxlora.data: packing, masks, determinism, resumption, splits and errors."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxlora import data
from jaxlora.data import Batch, DataConfig, IteratorState, documents, load_datasets, resolve_sources
from jaxlora.errors import DataError

# ----------------------------------------------------------------------------- tokenizers


class HFTok:
    """A byte-level BPE (HF `tokenizers`) with the jaxlora tokenizer's methods; ChatML."""

    def __init__(self):
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        corpus = ["hello world, the quick brown fox jumps", "def f(x):\n    return x + 1\n"]
        tk.train_from_iterator(corpus * 10, trainer)
        self.tk = tk
        self.pad_id, self.eos_id = tk.token_to_id("<pad>"), tk.token_to_id("<|endoftext|>")
        self.bos_id = None
        self.im_end_id = tk.token_to_id("<|im_end|>")

    def encode(self, text, add_special_tokens=False):
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids):
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt=True):  # io.Tokenizer's default
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class CharTok:
    """One token per character (id = code point), EOS = 1, pad = 0: layouts by hand."""

    eos_id, pad_id, bos_id = 1, 0, None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) if i > 1 else "|" for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        raise NotImplementedError


@pytest.fixture(scope="module")
def tok():
    return HFTok()


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def write_jsonl(path, records):
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()


def text_corpus(tmp_path, n=10):
    """n distinct documents of different lengths, one per file."""
    docs = [" ".join(WORDS[i % len(WORDS) :] + WORDS[: i % 5]) + f" doc{i}" for i in range(n)]
    for i, d in enumerate(docs):
        write(tmp_path / "corpus" / f"d{i:02d}.txt", d)
    return docs  # sorted file order == index order


def rows_of(batches):
    """(inputs, targets, loss_mask, segment_ids, positions) of every non-empty row."""
    out = []
    for b in batches:
        assert isinstance(b, Batch)
        assert b.inputs.dtype == np.int32 and b.targets.dtype == np.int32
        assert b.segment_ids.dtype == np.int32 and b.positions.dtype == np.int32
        assert b.loss_mask.dtype == np.float32
        for r in range(b.inputs.shape[0]):
            row = tuple(x[r] for x in b)
            if row[3].any():
                out.append(row)
    return out


def unpack(rows, packed=True):
    """The token stream and its per-transition loss mask, reconstructed from packed rows."""
    stream, mask = [], []
    for inp, tgt, lm, seg, _ in rows:
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all(), "padding only at the tail"
        piece = list(inp[:n]) + [tgt[n - 1]]
        if stream and packed:
            assert stream[-1] == piece[0], "consecutive rows share one token"
            piece = piece[1:]
        stream += piece
        mask += list(lm[:n])
    return [int(t) for t in stream], mask


def doc_tokens(tok, text):
    return tok.encode(text) + [tok.eos_id]


# ----------------------------------------------------------------------------- sources


def test_stdlib_source_resolves_to_real_files():
    files = resolve_sources(["stdlib:json/*.py"])
    stdlib = sysconfig.get_paths()["stdlib"]
    assert os.path.join(stdlib, "json", "__init__.py") in files
    assert os.path.join(stdlib, "json", "decoder.py") in files
    assert files == sorted(files) and all(os.path.isfile(f) for f in files)
    assert not any("site-packages" in f for f in resolve_sources(["stdlib:*/__init__.py"]))


def test_folder_glob_and_file_sources(tmp_path):
    a = write(tmp_path / "x" / "b.txt", "b")
    b = write(tmp_path / "x" / "sub" / "a.txt", "a")
    c = write(tmp_path / "x" / "__pycache__" / "c.txt", "c")
    write(tmp_path / "x" / ".hidden", "h")
    assert resolve_sources([str(tmp_path / "x")]) == sorted([a, b])  # folders skip caches
    assert resolve_sources([str(tmp_path / "x" / "**" / "*.txt"), a]) == sorted([a, b, c])


def test_stdlib_corpus_end_to_end(tok):
    cfg = DataConfig(
        sources=("stdlib:json/*.py",),
        validation_sources=("stdlib:json/tool.py",),
        seq_len=64,
        batch_size=4,
        validation_fraction=0.0,
    )
    ds = load_datasets(cfg, tok)
    n_files = len(resolve_sources(["stdlib:json/*.py"]))
    assert ds.train.stats.documents == n_files - 1
    assert ds.validation.stats.documents == 1
    assert not any(f.endswith("tool.py") for f in ds.train.files)
    stream, _ = unpack(rows_of(ds.validation.eval_batches()))
    with open(ds.validation.files[0], encoding="utf-8") as f:
        assert stream == doc_tokens(tok, f.read())


# ----------------------------------------------------------------------------- packing


def test_hand_computed_layout(tmp_path):
    write(tmp_path / "a.txt", "abc")
    write(tmp_path / "b.txt", "defgh")
    cfg = DataConfig(
        sources=(str(tmp_path),), seq_len=4, batch_size=2, shuffle=False, validation_fraction=0.0
    )
    train = load_datasets(cfg, CharTok()).train
    (b0, b1) = list(train.eval_batches())
    c = [ord(x) for x in "abcdefgh"]
    a_, b_, c_, d_, e_, f_, g_, h_ = c
    np.testing.assert_array_equal(b0.inputs, [[a_, b_, c_, 1], [d_, e_, f_, g_]])
    np.testing.assert_array_equal(b0.targets, [[b_, c_, 1, d_], [e_, f_, g_, h_]])
    np.testing.assert_array_equal(b0.loss_mask, [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(b0.segment_ids, [[1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(b0.positions, [[0, 1, 2, 3], [0, 1, 2, 3]])
    # last row: the tail of "defgh" + EOS, then padding; the last batch is padded with a row
    np.testing.assert_array_equal(b1.inputs, [[h_, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b1.targets, [[1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b1.loss_mask, [[1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b1.segment_ids, [[1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b1.positions, np.zeros((2, 4)))
    assert train.stats._replace() == data.DataStats(
        files=2,
        skipped_files=0,
        documents=2,
        empty_documents=0,
        tokens=10,
        target_tokens=10,
        sequences=3,
        batches=2,
    )


def test_segments_within_a_row(tmp_path):
    for name, text in [("a", "ab"), ("b", "cde"), ("c", "f")]:
        write(tmp_path / f"{name}.txt", text)
    cfg = DataConfig(
        sources=(str(tmp_path),), seq_len=12, batch_size=1, shuffle=False, validation_fraction=0.0
    )
    (b,) = load_datasets(cfg, CharTok()).train.eval_batches()
    # stream: a b E c d e E f E (9 tokens -> 8 input positions)
    np.testing.assert_array_equal(b.segment_ids[0], [1, 1, 1, 2, 2, 2, 2, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 0, 1, 2, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.loss_mask[0], [1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("seq_len", [5, 16, 200])
def test_packing_round_trip(tmp_path, tok, shuffle, seq_len):
    docs = text_corpus(tmp_path)
    cfg = DataConfig(
        sources=(str(tmp_path / "corpus"),), seq_len=seq_len, batch_size=3, shuffle=shuffle, seed=3,
        validation_fraction=0.0,
    )
    train = load_datasets(cfg, tok).train
    it = train.iterator()
    epoch = [next(it) for _ in range(train.batches_per_epoch)]
    assert it.state() == IteratorState(1, 0)
    stream, _ = unpack(rows_of(epoch))
    expected = [doc_tokens(tok, d) for d in docs]
    if shuffle:  # some order of the documents, each exactly once
        got, cur = [], []
        for t in stream:
            cur.append(t)
            if t == tok.eos_id:
                got.append(cur)
                cur = []
        assert not cur and sorted(got) == sorted(expected) and got != expected
    else:
        assert stream == [t for d in expected for t in d]
    assert train.stats.tokens == len(stream)
    assert train.stats.sequences == len(rows_of(epoch))


def test_unpacked_mode_one_document_per_row(tmp_path, tok):
    docs = text_corpus(tmp_path, n=4)
    cfg = DataConfig(
        sources=(str(tmp_path / "corpus"),), seq_len=8, batch_size=2, shuffle=False, pack=False,
        validation_fraction=0.0,
    )
    rows = rows_of(load_datasets(cfg, tok).train.eval_batches())
    got, cur = [], []
    for row in rows:
        assert set(np.unique(row[3])) <= {0, 1}
        piece, _ = unpack([row])
        cur = cur + piece[1:] if cur else piece
        if piece[-1] == tok.eos_id:
            got.append(cur)
            cur = []
    assert got == [doc_tokens(tok, d) for d in docs]


def test_packing_is_what_a_segment_masked_model_sees(tmp_path):
    """Every trained target sees exactly a contiguous stretch of its own document.

    A model that masks attention with `segment_ids` (same segment, causal) and embeds
    `positions` then computes, for each target, the same thing as on that stretch alone.
    """
    docs = ["abcdefghij", "klm", "nopqrstuvwxyz", "AB", "CDEFGHIJKLMNOPQRSTUVWXYZ"]
    for i, d in enumerate(docs):
        write(tmp_path / f"{i}.txt", d)
    cfg = DataConfig(
        sources=(str(tmp_path),), seq_len=7, batch_size=2, seed=1, validation_fraction=0.0
    )
    train = load_datasets(cfg, CharTok()).train
    it = train.iterator()
    rows = rows_of(next(it) for _ in range(2 * train.batches_per_epoch))
    doc_toks = [CharTok().encode(d) + [1] for d in docs]
    trained = 0
    for inp, tgt, lm, seg, pos in rows:
        T = len(inp)
        allowed = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0) & np.tri(T, dtype=bool)
        for t in np.flatnonzero(lm):
            ctx = inp[allowed[t]]
            np.testing.assert_array_equal(pos[allowed[t]], np.arange(len(ctx)))
            window = [*map(int, ctx), int(tgt[t])]
            owners = [
                d for d in doc_toks if any(d[k : k + len(window)] == window for k in range(len(d)))
            ]
            assert len(owners) == 1
            trained += 1
    # each transition inside a document is trained exactly once per epoch (two epochs here)
    assert trained == 2 * sum(len(d) - 1 for d in doc_toks)


# ----------------------------------------------------------------------------- loss masks


def test_prompt_completion_mask_token_by_token(tmp_path, tok):
    recs = [
        {"prompt": "the quick brown", "completion": " fox jumps"},
        {"prompt": "def f(x):\n", "completion": "    return x + 1\n"},
        {"prompt": "hello", "completion": " world, hello world"},
        {"prompt": "", "completion": "x"},
    ]
    write_jsonl(tmp_path / "pc.jsonl", recs)
    cfg = DataConfig(
        sources=(str(tmp_path / "pc.jsonl"),), seq_len=6, batch_size=2, shuffle=False,
        validation_fraction=0.0,
    )
    stream, mask = unpack(rows_of(load_datasets(cfg, tok).train.eval_batches()))
    exp_stream, exp_mask = [], []
    for r in recs:
        p, c = tok.encode(r["prompt"]), tok.encode(r["completion"])
        toks = p + c + [tok.eos_id]
        exp_mask += [0.0] if exp_stream else []  # EOS -> next document: never trained
        exp_stream += toks
        # transition into token j is trained iff j is a completion token or the final EOS
        exp_mask += [float(j >= len(p)) for j in range(1, len(toks))]
    assert stream == exp_stream
    assert mask == exp_mask


def test_chat_mask_only_assistant_content_and_end_token(tmp_path, tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick fox"},
        {"role": "user", "content": "def f(x)"},
        {"role": "assistant", "content": "return x + 1"},
    ]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    cfg = DataConfig(
        sources=(str(tmp_path),), seq_len=16, batch_size=2, shuffle=False, validation_fraction=0.0
    )
    stream, mask = unpack(rows_of(load_datasets(cfg, tok).train.eval_batches()))
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert tok.decode(stream) == rendered + "<|endoftext|>"
    # runs of trained targets, decoded
    runs, cur = [], []
    for j, m in enumerate(mask):
        if m:
            cur.append(stream[j + 1])
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == ["the quick fox<|im_end|>", "return x + 1<|im_end|>"]
    assert sum(mask) == len(tok.encode("the quick fox")) + len(tok.encode("return x + 1")) + 2


def test_text_jsonl_and_padding_masks(tmp_path, tok):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": ""}, {"text": "fox"}])
    cfg = DataConfig(sources=(str(tmp_path),), seq_len=32, batch_size=2, validation_fraction=0.0)
    train = load_datasets(cfg, tok).train
    assert train.stats.documents == 2 and train.stats.empty_documents == 1
    (b,) = train.eval_batches()
    pad = b.segment_ids == 0
    assert pad.any() and (b.loss_mask[pad] == 0).all() and (b.positions[pad] == 0).all()
    assert (b.inputs[pad] == tok.pad_id).all() and (b.targets[pad] == tok.pad_id).all()


# ----------------------------------------------------------------------------- determinism


def first_batches(ds, n):
    it = ds.iterator()
    return [next(it) for _ in range(n)]


def same(xs, ys):
    return all(
        all(np.array_equal(a, b) for a, b in zip(x, y, strict=True))
        for x, y in zip(xs, ys, strict=True)
    )


def test_determinism_and_seeds(tmp_path, tok):
    text_corpus(tmp_path, n=12)
    cfg = DataConfig(
        sources=(str(tmp_path / "corpus"),), seq_len=8, batch_size=2, seed=7,
        validation_fraction=0.0,
    )
    n = load_datasets(cfg, tok).train.batches_per_epoch
    run1 = first_batches(load_datasets(cfg, tok).train, 2 * n)
    run2 = first_batches(load_datasets(cfg, tok).train, 2 * n)
    assert same(run1, run2)
    assert not same(run1[:n], run1[n:]), "each epoch is reshuffled"
    other = first_batches(load_datasets(DataConfig(**{**cfg.__dict__, "seed": 8}), tok).train, n)
    assert not same(run1[:n], other)
    noshuf = DataConfig(**{**cfg.__dict__, "shuffle": False})
    plain = first_batches(load_datasets(noshuf, tok).train, 2 * n)
    assert same(plain[:n], plain[n:])


def test_resume_from_saved_state(tmp_path, tok):
    text_corpus(tmp_path, n=9)
    cfg = DataConfig(
        sources=(str(tmp_path / "corpus"),), seq_len=6, batch_size=2, seed=1,
        validation_fraction=0.0,
    )
    train = load_datasets(cfg, tok).train
    n = train.batches_per_epoch
    it = train.iterator()
    for _ in range(n - 2):
        next(it)
    saved = json.loads(json.dumps(it.state().as_dict()))  # plain data, survives a checkpoint
    assert saved == {"epoch": 0, "index": n - 2}
    expected = [next(it) for _ in range(5)]  # crosses into epoch 1
    assert it.state() == IteratorState(1, 3)
    fresh = load_datasets(cfg, tok).train  # a new process: nothing cached
    resumed = fresh.iterator(saved)
    assert same([next(resumed) for _ in range(5)], expected)
    assert same([next(fresh.iterator(IteratorState(1, 3)))], [next(it)])


def test_eval_batches_finite_and_deterministic(tmp_path, tok):
    docs = text_corpus(tmp_path, n=7)
    cfg = DataConfig(
        sources=(str(tmp_path / "corpus"),), seq_len=10, batch_size=4, seed=5,
        validation_fraction=0.0,
    )
    train = load_datasets(cfg, tok).train
    a, b = list(train.eval_batches()), list(train.eval_batches())
    assert len(a) == train.stats.batches and same(a, b)
    assert unpack(rows_of(a))[0] == [t for d in docs for t in doc_tokens(tok, d)]


# ----------------------------------------------------------------------------- splits


def docs_of(ds, tok):
    stream, _ = unpack(rows_of(ds.eval_batches()))
    return tok.decode(stream).split("<|endoftext|>")[:-1]


def test_validation_fraction_split_is_disjoint_by_document(tmp_path, tok):
    recs = [{"text": f"{w} number {i}"} for i, w in enumerate(WORDS)]
    write_jsonl(tmp_path / "a.jsonl", recs[:7])
    write_jsonl(tmp_path / "b.jsonl", recs[7:])
    cfg = DataConfig(sources=(str(tmp_path),), validation_fraction=0.25, seq_len=8, batch_size=2)
    ds = load_datasets(cfg, tok)
    tr, va = docs_of(ds.train, tok), docs_of(ds.validation, tok)
    assert len(va) == round(0.25 * len(recs)) and len(tr) + len(va) == len(recs)
    assert not set(tr) & set(va)
    assert sorted(tr + va) == sorted(r["text"] for r in recs)
    assert ds.train.stats.documents + ds.validation.stats.documents == len(recs)
    assert ds.validation.stats.files == len(ds.validation.files) <= 2
    cfg2 = DataConfig(**{**cfg.__dict__, "seed": 99})
    assert docs_of(load_datasets(cfg2, tok).validation, tok) != va
    assert (
        load_datasets(DataConfig(**{**cfg.__dict__, "validation_fraction": 0.0}), tok).validation
        is None
    )


def test_max_documents(tmp_path, tok):
    docs = text_corpus(tmp_path, n=6)
    cfg = DataConfig(
        sources=(str(tmp_path / "corpus"),), seq_len=8, max_documents=4, validation_fraction=0.0
    )
    assert docs_of(load_datasets(cfg, tok).train, tok) == docs[:4]
    all_docs = DataConfig(**{**cfg.__dict__, "max_documents": 0})  # TOML's "all"
    assert load_datasets(all_docs, tok).train.stats.documents == 6
    with pytest.raises(DataError, match="max_documents"):
        DataConfig(sources=("x",), max_documents=-1, validation_fraction=0.0, seq_len=512)


# ----------------------------------------------------------------------------- errors


def test_bad_batch_size_and_seq_len():
    for bad in (0, -2):
        with pytest.raises(DataError, match="batch_size"):
            DataConfig(sources=("x",), batch_size=bad, validation_fraction=0.0, seq_len=512)
        with pytest.raises(DataError, match="seq_len"):
            DataConfig(sources=("x",), seq_len=bad, validation_fraction=0.0)


def test_seq_len_above_model_context(tmp_path, tok):
    text_corpus(tmp_path, n=2)
    cfg = DataConfig(sources=(str(tmp_path / "corpus"),), seq_len=64, validation_fraction=0.0)
    with pytest.raises(DataError, match="exceeds the model's context of 32"):
        load_datasets(cfg, tok, max_positions=32)
    train = load_datasets(cfg, tok, max_positions=64).train
    train.check(64)
    with pytest.raises(DataError, match="context"):
        train.check(63)


@pytest.mark.parametrize(
    "source, match",
    [
        ("nothing_here_*.txt", "glob matches no files"),
        ("missing.txt", "no such file"),
        ("stdlib:no_such_package_zz/*.py", "no files match"),
        ("emptydir", "folder holds no files"),
    ],
)
def test_missing_sources(tmp_path, tok, source, match):
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match=match):
        load_datasets(
            DataConfig(
                sources=(str(tmp_path / source) if not source.startswith("stdlib:") else source,),
                validation_fraction=0.0, seq_len=512,
            ),
            tok,
        )


def test_empty_dataset(tmp_path, tok):
    write(tmp_path / "a.txt", "")
    write_jsonl(tmp_path / "b.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="empty"):
        load_datasets(DataConfig(
            sources=(str(tmp_path),), validation_fraction=0.0, seq_len=512
        ), tok)


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "ok"}', "", '{"text": "bad"'], r"bad\.jsonl:3: malformed JSON"),
        (['{"text": "ok"}', '{"body": "x"}'], r"bad\.jsonl:2: unknown record schema \['body'\]"),
        (["[1, 2]"], r"bad\.jsonl:1: unknown record schema"),
        (['{"text": 5}'], r"bad\.jsonl:1: 'text' must be a string"),
        (['{"messages": [{"role": "user"}]}'], r"bad\.jsonl:1: 'messages'"),
    ],
)
def test_bad_jsonl(tmp_path, tok, lines, match):
    write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        load_datasets(DataConfig(
            sources=(str(tmp_path),), validation_fraction=0.0, seq_len=512
        ), tok)


def test_invalid_utf8_is_skipped_and_counted(tmp_path, tok):
    write(tmp_path / "good.txt", "hello world")
    write(tmp_path / "bad.txt", b"hello \xff\xfe world")
    write(tmp_path / "bad.jsonl", b'{"text": "fine"}\n{"text": "\xc3("}\n')
    train = load_datasets(DataConfig(
        sources=(str(tmp_path),), validation_fraction=0.0, seq_len=512
    ), tok).train
    assert train.stats.skipped_files == 2 and train.stats.documents == 1
    assert train.files == (str(tmp_path / "good.txt"),)
    # each skipped file has a notice that names it, the line and the byte (issue 18)
    assert train.stats.notices == (
        f"{tmp_path / 'bad.jsonl'}:2: file skipped: invalid UTF-8 at byte 10 of the line",
        f"{tmp_path / 'bad.txt'}: file skipped: invalid UTF-8 at byte 6 of the file",
    )
    os.remove(tmp_path / "good.txt")
    with pytest.raises(DataError, match=r"empty.*\(2 files skipped for invalid UTF-8\)"):
        load_datasets(DataConfig(
            sources=(str(tmp_path),), validation_fraction=0.0, seq_len=512
        ), tok)


def test_unreadable_file(tmp_path, tok, monkeypatch):
    path = write(tmp_path / "locked.txt", "hello")
    real_open = open

    def fake_open(p, *args, **kwargs):  # root can read mode-000 files, so simulate it
        if str(p) == path:
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(documents, "open", fake_open, raising=False)
    with pytest.raises(DataError, match=r"locked\.txt: cannot read: Permission denied"):
        load_datasets(DataConfig(sources=(path,), validation_fraction=0.0, seq_len=512), tok)


def test_iterator_state_out_of_range(tmp_path, tok):
    text_corpus(tmp_path, n=2)
    train = load_datasets(DataConfig(
        sources=(str(tmp_path / "corpus"),), validation_fraction=0.0, seq_len=512
    ), tok).train
    with pytest.raises(DataError, match="does not fit"):
        train.iterator({"epoch": 0, "index": train.batches_per_epoch})


# --------------------------------------------------------------------------------------------
# Nothing dropped without a word (issue 18): each skip has a notice, or it is an error
# --------------------------------------------------------------------------------------------
def test_an_empty_dataset_names_its_files_and_why(tmp_path, tok):
    write(tmp_path / "bad.txt", b"\xff")
    write(tmp_path / "blank.txt", "")
    with pytest.raises(DataError) as e:
        load_datasets(DataConfig(sources=(str(tmp_path),), validation_fraction=0.0), tok)
    msg = str(e.value)
    assert f"no documents with tokens in {tmp_path / 'bad.txt'}, {tmp_path / 'blank.txt'}" in msg
    assert f"{tmp_path / 'bad.txt'}: file skipped: invalid UTF-8 at byte 0" in msg


def test_unknown_chat_role_is_an_error_naming_file_line_and_role(tmp_path, tok):
    good = {"role": "user", "content": "hi"}
    write(tmp_path / "chat.jsonl", json.dumps({"messages": [good, {"role": "assistant", "content": "yo"}]})
          + "\n" + json.dumps({"messages": [good, {"role": "bot", "content": "yo"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: unknown chat role 'bot'; expected one of "
                       r"system, user, assistant, tool"):
        load_datasets(DataConfig(sources=(str(tmp_path),), validation_fraction=0.0), tok)


def test_data_with_nothing_to_learn_is_refused(tmp_path, tok):
    write(tmp_path / "p.jsonl", json.dumps({"prompt": "2+2=", "completion": ""}) + "\n")
    with pytest.raises(DataError, match=r"training dataset has no tokens to learn from in .*p\.jsonl"):
        load_datasets(DataConfig(sources=(str(tmp_path),), validation_fraction=0.0), tok)


# ----------------------------------------------------------------------------- hosts


def _host_corpus(tmp_path):
    """Two JSONL files and a text file of records of different lengths; the documents in
    corpus order (files sorted, lines in order)."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 2 + 7 * (i % 3))) + f" n{i}" for i in range(40)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:25]])
    write(tmp_path / "b.txt", "a plain text document in the middle")
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts[25:]])
    return texts[:25] + ["a plain text document in the middle"] + texts[25:]


class _Reads:
    """Records the bytes each file opened by `jaxlora.data.documents` hands out."""

    def __init__(self):
        self.bytes: dict[str, int] = {}

    def open(self, path, mode="r"):
        f, reads = open(path, mode), self

        class Counted:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def __getattr__(self, name):
                return getattr(f, name)

            def _count(self, out):
                reads.bytes[path] = reads.bytes.get(path, 0) + len(out)
                return out

            def read(self, *a):
                return self._count(f.read(*a))

            def readline(self, *a):
                return self._count(f.readline(*a))

        return Counted()


@pytest.mark.parametrize("hosts", [2, 3])
def test_host_parts_are_the_corpus_cut_in_byte_ranges(tmp_path, tok, hosts):
    want = _host_corpus(tmp_path / "train")
    write_jsonl(tmp_path / "val.jsonl", [{"text": f"held out {w}"} for w in WORDS])
    cfg = DataConfig(sources=(str(tmp_path / "train"),),
                     validation_sources=(str(tmp_path / "val.jsonl"),), seq_len=8,
                     batch_size=6, seed=3)
    parts = data.host_datasets(cfg, tok, hosts)
    got = [docs_of(p.train, tok) for p in parts]
    assert all(got) and [d for g in got for d in g] == want  # in corpus order, once each
    val = [d for p in parts for d in docs_of(p.validation, tok)]
    assert val == [f"held out {w}" for w in WORDS]
    for split in ("train", "validation"):
        assert len({getattr(p, split).batches_per_epoch for p in parts}) == 1  # lockstep
        assert next(getattr(parts[-1], split).iterator()).inputs.shape == (6 // hosts, 8)


def test_a_host_reads_no_more_than_its_range(tmp_path, tok, monkeypatch):
    _host_corpus(tmp_path)
    files = resolve_sources([str(tmp_path)])
    total = sum(os.path.getsize(f) for f in files)
    longest = max(len(line) for f in files for line in Path(f).read_bytes().splitlines())
    for p in range(4):
        reads = _Reads()
        monkeypatch.setattr(documents, "open", reads.open, raising=False)
        docs = documents.index_documents(files, tok, None, (p, 4))
        assert 0 < sum(reads.bytes.values()) <= total / 4 + 2 * longest
        assert set(reads.bytes) <= {f for f, _, _ in documents.host_ranges(files, (p, 4))}
        assert len(docs.length) > 0


def test_held_out_documents_do_not_depend_on_the_host_count(tmp_path, tok):
    want = _host_corpus(tmp_path)
    cfg = DataConfig(sources=(str(tmp_path),), validation_fraction=0.25, seq_len=8,
                     batch_size=6, seed=3)

    def split(hosts):
        ds = data.host_datasets(cfg, tok, hosts)
        return ([d for p in ds for d in docs_of(p.train, tok)],
                [d for p in ds for d in docs_of(p.validation, tok)])

    (train2, val2), (train3, val3) = split(2), split(3)
    assert sorted(train2 + val2) == sorted(want) and not set(train2) & set(val2)
    assert val2 == val3 and train2 == train3  # each document drawn alone
    assert 0.1 < len(val2) / len(want) < 0.45  # about the fraction (10 of 41 expected)
    other = DataConfig(**{**cfg.__dict__, "seed": 4})
    assert [d for p in data.host_datasets(other, tok, 2) for d in docs_of(p.validation, tok)] != val2


def test_hosts_with_fewer_tokens_pad_to_the_same_batches(tmp_path, tok):
    # host 0's bytes are two long documents, host 1's many short ones (pack=False: a row each)
    long = " ".join(WORDS * 3)
    recs = [{"text": long}, {"text": long}] + [{"text": w} for w in WORDS * 3]
    write_jsonl(tmp_path / "a.jsonl", recs)
    cfg = DataConfig(sources=(str(tmp_path),), validation_fraction=0.0, seq_len=64,
                     batch_size=4, pack=False)
    few, many = (d.train for d in data.host_datasets(cfg, tok, 2))
    assert many.stats.sequences > 2 * few.stats.sequences  # the layouts differ
    assert few.batches_per_epoch == many.batches_per_epoch == -(-many.stats.sequences // 2)
    own = -(-few.stats.sequences // 2)  # the short host's batches with rows in them
    tail = list(few.eval_batches())[own:]
    assert tail and all(not b.loss_mask.any() and not b.segment_ids.any() for b in tail)
    its = [few.iterator(), many.iterator()]
    for _ in range(few.batches_per_epoch + 1):  # in lockstep across the epoch boundary
        for it in its:
            next(it)
        assert its[0].state() == its[1].state()


def test_a_host_without_documents_steps_on_padding(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": " ".join(WORDS * 4)}])  # one line: host 0's
    cfg = DataConfig(sources=(str(tmp_path),), validation_fraction=0.0, seq_len=8, batch_size=2)
    full, empty = (d.train for d in data.host_datasets(cfg, tok, 2))
    assert empty.stats.documents == 0 and full.stats.documents == 1
    assert empty.batches_per_epoch == full.batches_per_epoch > 1
    assert all(not b.loss_mask.any() for b in empty.eval_batches())


def test_an_empty_split_fails_on_every_host_alike(tmp_path, tok):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "completion": ""} for i in range(6)])
    cfg = DataConfig(sources=(str(tmp_path),), validation_fraction=0.0, seq_len=8, batch_size=2)
    counts = []

    def gather(v):  # what process_allgather would return: both hosts' counts
        counts.append(v)
        return np.stack([v, v])

    for p in range(2):
        with pytest.raises(DataError, match="training dataset has no tokens to learn from"):
            load_datasets(cfg, tok, shard=(p, 2), gather=gather)
    assert len(counts) == 2  # each host got as far as the shared counts


def test_max_documents_caps_each_host_at_its_share(tmp_path, tok):
    want = _host_corpus(tmp_path)
    cfg = DataConfig(sources=(str(tmp_path),), validation_fraction=0.0, seq_len=8,
                     batch_size=2, max_documents=6)
    parts = [docs_of(d.train, tok) for d in data.host_datasets(cfg, tok, 2)]
    assert [len(p) for p in parts] == [3, 3]
    assert parts[0] == want[:3] and set(parts[1]) <= set(want[3:])


def test_shard_0_of_1_is_the_whole_corpus_bit_for_bit(tmp_path, tok):
    text_corpus(tmp_path, n=9)
    cfg = DataConfig(sources=(str(tmp_path / "corpus"),), seq_len=6, batch_size=2, seed=1,
                     validation_fraction=0.3)
    a, b = load_datasets(cfg, tok), load_datasets(cfg, tok, shard=(0, 1))
    n = a.train.batches_per_epoch
    assert a.train.stats == b.train.stats and a.validation.stats == b.validation.stats
    assert same(first_batches(a.train, 2 * n), first_batches(b.train, 2 * n))
    assert same(list(a.validation.eval_batches()), list(b.validation.eval_batches()))


def test_hosts_that_cannot_split_the_batch_or_lack_the_counts(tmp_path, tok):
    text_corpus(tmp_path, n=3)
    cfg = DataConfig(sources=(str(tmp_path / "corpus"),), seq_len=6, batch_size=5,
                     validation_fraction=0.0)
    gather = lambda v: v[None]  # noqa: E731
    with pytest.raises(DataError, match="data.batch_size: 5 rows cannot be split over 2 hosts"):
        load_datasets(cfg, tok, shard=(0, 2), gather=gather)
    with pytest.raises(DataError, match="data.batch_size: 5 rows cannot be split over 2 hosts"):
        data.host_datasets(cfg, tok, 2)
    four = DataConfig(**{**cfg.__dict__, "batch_size": 4})
    with pytest.raises(ValueError, match="needs `gather`"):
        load_datasets(four, tok, shard=(1, 2))
    with pytest.raises(ValueError, match="shard"):
        load_datasets(four, tok, shard=(2, 2), gather=gather)


def test_a_bad_line_in_a_later_hosts_part_is_named_by_its_byte_offset(tmp_path, tok):
    lines = [json.dumps({"text": f"record {w}"}) + "\n" for w in WORDS]
    lines[10] = '{"text": broken\n'
    write(tmp_path / "a.jsonl", "".join(lines))
    at = sum(len(line) for line in lines[:10])
    cfg = DataConfig(sources=(str(tmp_path),), validation_fraction=0.0, seq_len=8, batch_size=2)
    with pytest.raises(DataError, match=rf"a\.jsonl: the line at byte {at}: malformed JSON"):
        data.host_datasets(cfg, tok, 2)
    with pytest.raises(DataError, match=r"a\.jsonl:11: malformed JSON"):  # one host: the line
        load_datasets(cfg, tok)
