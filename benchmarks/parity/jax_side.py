"""jaxlora side of the transformers parity check (see README.md in this folder).

    python benchmarks/parity/jax_side.py [MODEL] [OUT]

MODEL: `smollm2-135m-instruct` (default) or `gemma3-270m` (or a .gguf path). For each prompt
(a chat turn rendered with the model's template, a code prefix, and a long code prefix of
more than 512 tokens, so Gemma 3's sliding window masks keys in the forward and in the KV cache
path) it writes the prompt ids, jaxlora's float32 logits and a 40-token greedy continuation
(no EOS stop) into OUT.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import jax.numpy as jnp
import numpy as np

from jaxlora import models
from jaxlora.generate import generate_tokens
from jaxlora.io import load_model

MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
OUT = sys.argv[2] if len(sys.argv) > 2 else "/tmp/jaxlora_parity"
QUESTION = "What is the capital of France?"
CODE = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
N_NEW = 40


def prompts(tokenizer) -> dict[str, list[int]]:
    """name -> prompt ids: the chat turn (as the template writes it), short and long code."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                         add_generation_prompt=True)
    long = textwrap.dedent(open(textwrap.__file__).read())[:2600]  # a fixed stdlib file's start
    return {"chat": tokenizer.encode(chat), "code": tokenizer.encode(CODE, add_special_tokens=True),
            "long": tokenizer.encode(long, add_special_tokens=True)}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    m = load_model(MODEL)
    cases = prompts(m.tokenizer)
    for name, ids in cases.items():
        logits = models.forward(m.config, m.params, jnp.asarray([ids]))  # [1, T, V] float32
        greedy = generate_tokens(m.config, m.params, [ids], max_new_tokens=N_NEW, eos_id=[])[0]
        np.save(f"{OUT}/{name}_prompt_ids.npy", np.asarray(ids, np.int64))
        np.save(f"{OUT}/{name}_jax_logits.npy", np.asarray(logits[0], np.float32))
        np.save(f"{OUT}/{name}_jax_greedy.npy", np.asarray(greedy, np.int64))
        print(f"{name}: prompt {len(ids)} tokens; greedy: "
              f"{m.tokenizer.decode(greedy, skip_special_tokens=False)!r}")
    with open(f"{OUT}/cases.json", "w") as f:
        json.dump({"source": m.source, "cases": list(cases)}, f)


if __name__ == "__main__":
    main()
