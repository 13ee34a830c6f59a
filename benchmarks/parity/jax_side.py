"""jaxlora side of the transformers parity check (see README.md in this folder)."""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np

from jaxlora import models
from jaxlora.generate import generate_tokens
from jaxlora.io import load_model

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/jaxlora_parity"
QUESTION = "What is the capital of France?"
N_NEW = 40


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    m = load_model("smollm2-135m-instruct")
    text = m.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                           add_generation_prompt=True)
    ids = m.tokenizer.encode(text)
    logits = models.forward(m.config, m.params, jnp.asarray([ids]))  # [1, T, V] float32
    greedy = generate_tokens(m.config, m.params, [ids], max_new_tokens=N_NEW, eos_id=[])[0]
    np.save(f"{OUT}/prompt_ids.npy", np.asarray(ids, np.int64))
    np.save(f"{OUT}/jax_logits.npy", np.asarray(logits[0], np.float32))
    np.save(f"{OUT}/jax_greedy.npy", np.asarray(greedy, np.int64))
    with open(f"{OUT}/source.txt", "w") as f:
        f.write(m.source)
    print(f"prompt {len(ids)} tokens; greedy: {m.tokenizer.decode(greedy)!r}")


if __name__ == "__main__":
    main()
