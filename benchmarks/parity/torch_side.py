"""transformers side of the parity check; run with the scratch venv (see README.md).

    /tmp/scratch/bin/python benchmarks/parity/torch_side.py [OUT]

Loads the GGUF that `jax_side.py` loaded (OUT/cases.json) with transformers in float32 and, for
each prompt, compares logits and a 40-step greedy loop with transformers' KV cache.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/jaxlora_parity"


def compare(model, name: str) -> bool:
    ids = torch.from_numpy(np.load(f"{OUT}/{name}_prompt_ids.npy"))[None]
    jax_logits = np.load(f"{OUT}/{name}_jax_logits.npy").astype(np.float64)
    jax_greedy = np.load(f"{OUT}/{name}_jax_greedy.npy").tolist()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        ref = out.logits[0].double().numpy()
        # greedy loop with transformers' KV cache, no EOS stop
        past, nxt, greedy = out.past_key_values, int(out.logits[0, -1].argmax()), []
        for _ in range(len(jax_greedy)):
            greedy.append(nxt)
            o = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, int(o.logits[0, -1].argmax())
    rel = np.abs(jax_logits - ref).max() / np.abs(ref).max()
    same = sum(a == b for a, b in zip(greedy, jax_greedy, strict=True))
    first_diff = next((i for i, (a, b) in enumerate(zip(greedy, jax_greedy, strict=True)) if a != b), None)
    print(f"[{name}] prompt tokens: {ids.shape[1]}; logits max|diff| = {np.abs(jax_logits - ref).max():.3e}, "
          f"max|ref| = {np.abs(ref).max():.3f}, relative = {rel:.3e} (limit 1e-4)")
    print(f"[{name}] last-position argmax agree: {int(ref[-1].argmax()) == int(jax_logits[-1].argmax())}")
    print(f"[{name}] greedy tokens agreeing: {same}/{len(jax_greedy)} (first difference: {first_diff})")
    return bool(rel <= 1e-4 and same == len(jax_greedy))


def main() -> None:
    info = json.load(open(f"{OUT}/cases.json"))
    src = info["source"]
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(src), gguf_file=os.path.basename(src), dtype=torch.float32)
    model.eval()
    ok = all([compare(model, name) for name in info["cases"]])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
