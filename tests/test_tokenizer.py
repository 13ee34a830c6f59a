"""Tokenizer: SmolLM2 and Gemma 3 GGUF ids equal transformers' (stored fixtures), the
SentencePiece path on a tiny vocabulary, chat templates, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_helpers import CHAT_TEMPLATE, tiny_tokenizer_meta  # noqa: E402

from jaxlora.errors import ModelLoadError  # noqa: E402
from jaxlora.io import GGUFSource, resolve  # noqa: E402
from jaxlora.io.tokenizer import Tokenizer  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "smollm2_tokenizer_ids.json"
GEMMA_FIXTURE = Path(__file__).parent / "data" / "gemma3_tokenizer_ids.json"


@pytest.fixture(scope="module")
def smol():
    try:
        path = resolve("smollm2-135m-instruct")
    except ModelLoadError as e:
        pytest.skip(str(e))
    return GGUFSource(path).tokenizer()


@pytest.fixture(scope="module")
def fixture():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_smollm2_ids_match_transformers(smol, fixture):
    assert len(fixture["cases"]) >= 15
    for case in fixture["cases"]:
        assert smol.encode(case["text"]) == case["ids"], case["text"]
        assert smol.encode(case["text"], add_special_tokens=True) == case["ids_with_special"], case[
            "text"
        ]
        assert smol.decode(case["ids"], skip_special_tokens=False) == case["decoded"], case["text"]


def test_smollm2_batch_and_round_trip(smol, fixture):
    texts = [c["text"] for c in fixture["cases"]]
    assert smol.encode_batch(texts) == [c["ids"] for c in fixture["cases"]]
    for t in texts:  # byte-level BPE is lossless
        assert smol.decode(smol.encode(t), skip_special_tokens=False) == t


def test_smollm2_specials_and_chat(smol, fixture):
    sp = fixture["special"]
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.vocab_size) == (
        sp["bos"],
        sp["eos"],
        sp["pad"],
        sp["len"],
    )
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert smol.apply_chat_template(msgs, add_generation_prompt=True) == fixture["chat"]
    ids = smol.encode(fixture["chat"])
    assert smol.token_to_id("<|im_start|>") in ids  # special tokens stay whole
    assert "<|im_start|>" not in smol.decode(ids)  # and are skipped on decode by default


def test_smollm2_export_round_trip(tmp_path, smol, fixture):
    smol.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    for case in fixture["cases"]:
        assert again.encode(case["text"]) == case["ids"]
    assert (again.bos_id, again.eos_id, again.pad_id) == (smol.bos_id, smol.eos_id, smol.pad_id)
    assert again.chat_template == smol.chat_template
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == smol.id_to_token(smol.eos_id) == "<|im_end|>"


def test_tiny_add_special_tokens():
    meta = dict(tiny_tokenizer_meta(), **{"tokenizer.ggml.add_bos_token": True})
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("a", add_special_tokens=True) == [0, *tok.encode("a")]
    assert tok.encode("a") == [tok.token_to_id("a")]


def test_chat_template_features():
    tmpl = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{{ bos_token }}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    )
    tok = Tokenizer.from_gguf_metadata(
        dict(tiny_tokenizer_meta(), **{"tokenizer.chat_template": tmpl})
    )
    assert (
        tok.apply_chat_template([{"role": "user", "content": 'é"'}])
        == '<|endoftext|>"é\\""<|im_end|>'
    )
    with pytest.raises(ValueError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    none = Tokenizer.from_gguf_metadata(
        {k: v for k, v in tiny_tokenizer_meta().items() if k != "tokenizer.chat_template"}
    )
    with pytest.raises(ValueError, match="no chat_template"):
        none.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_is_sandboxed():
    from jinja2.exceptions import SecurityError

    tmpl = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_gguf_metadata(
        dict(tiny_tokenizer_meta(), **{"tokenizer.chat_template": tmpl})
    )
    with pytest.raises(SecurityError):
        tok.apply_chat_template([])


def test_unsupported_tokenizer_model():
    meta = dict(tiny_tokenizer_meta(), **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.model = 'bert' is not supported "
                                             r"\(supported: 'gpt2', 'llama'\)"):
        Tokenizer.from_gguf_metadata(meta, source="x.gguf")
    spm = dict(tiny_spm_meta(), **{"general.architecture": "llama"})
    with pytest.raises(ModelLoadError, match="x.gguf: .*SentencePiece.* Gemma files only, this one is 'llama'"):
        Tokenizer.from_gguf_metadata(spm, source="x.gguf")


def tiny_spm_meta() -> dict:
    """A Gemma-style SentencePiece vocabulary: specials, byte tokens, a few pieces whose file
    order disagrees with their scores ("bc" before "ab", scores favour "ab")."""
    head = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    pieces = ["\u2581", "a", "b", "c", "h", "i", "bc", "ab", "hi", "\u2581h", "\u2581hi"]
    tokens = head + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3] * 6 + [4, 4] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    scores[tokens.index("ab")] = 10.0
    return {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True}


def test_sentencepiece_merges_by_file_order_bytes_and_spaces():
    from jaxlora.models.gemma import CHAT_TEMPLATE as GEMMA_TEMPLATE

    meta = tiny_spm_meta()
    tok = Tokenizer.from_gguf_metadata(meta, chat_template=GEMMA_TEMPLATE)
    ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    byte = lambda b: ids[f"<0x{b:02X}>"]
    assert tok.encode("abc") == [ids["a"], ids["bc"]]  # file order, not scores
    assert tok.encode(" hi") == [ids["\u2581hi"]]  # spaces are "▁", no prefix space
    assert tok.encode("hi") == [ids["hi"]]
    assert tok.encode("a  b") == [ids["a"], 7, ids["b"]]  # "  " is stored as "▁▁"'s id
    assert tok.encode("é") == [byte(0xC3), byte(0xA9)]  # byte fallback
    assert tok.encode("<start_of_turn>a\n") == [4, ids["a"], 6]  # special / user-defined whole
    assert tok.encode("a", add_special_tokens=True) == [2, ids["a"]]
    for text in ("a  b é hi\nabc", " hi  "):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([4, ids["a"]]) == "a" and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    # Gemma 3's chat format (its GGUFs carry no template: the family's is used)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello "},
            {"role": "assistant", "content": "Hi"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi<end_of_turn>\n")
    assert tok.apply_chat_template(chat[1:2]) == (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([chat[2]])


@pytest.mark.slow
def test_gemma3_ids_match_transformers():
    """The real Gemma 3 270M vocabulary (the gemma3-270m package, installed by `make setup`)."""
    fixture = json.loads(GEMMA_FIXTURE.read_text(encoding="utf-8"))
    tok = GGUFSource(resolve("gemma3-270m")).tokenizer()
    assert len(fixture["cases"]) >= 20
    for case in fixture["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.encode(case["text"], add_special_tokens=True) == case["ids_with_special"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["decoded"], case["text"]
    sp = fixture["special"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (
        sp["bos"], sp["eos"], sp["pad"], sp["len"])
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert tok.encode(chat)[:3] == [tok.bos_id, tok.token_to_id("<start_of_turn>"),
                                    tok.token_to_id("user")]


def test_template_default_list_form(tmp_path):
    tok = Tokenizer.from_gguf_metadata(tiny_tokenizer_meta())
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "X"},
        {"name": "default", "template": CHAT_TEMPLATE},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_folder(tmp_path).chat_template == CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("Y")  # transformers v5 writes this file; it wins
    assert Tokenizer.from_folder(tmp_path).chat_template == "Y"
