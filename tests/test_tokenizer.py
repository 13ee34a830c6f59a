"""Tokenizer: SmolLM2 GGUF ids equal transformers' (stored fixture), chat template, export."""

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
    meta = dict(tiny_tokenizer_meta(), **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.model = 'llama' is not supported"):
        Tokenizer.from_gguf_metadata(meta, source="x.gguf")


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
