"""Compare jaxlora's GGUF weights with transformers' for SmolLM2 (manual check, not a test).

Step 1, with a Python that has torch + transformers + gguf (never a jaxlora dependency):
    SMOLLM2_DIR=... /tmp/scratch/bin/python tests/data/check_gguf_weight_parity.py dump /tmp/ref.npz
Step 2, with the project venv:
    .venv/bin/python tests/data/check_gguf_weight_parity.py compare /tmp/ref.npz
"""

import os
import sys

import numpy as np

LAYERS = (0, 1, 29)
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = {  # transformers name -> jaxlora path (kernels [in, out] = torch weight transposed)
    "model.layers.{i}.self_attn.q_proj.weight": "layers/attn/q_proj/kernel",
    "model.layers.{i}.self_attn.k_proj.weight": "layers/attn/k_proj/kernel",
    "model.layers.{i}.self_attn.v_proj.weight": "layers/attn/v_proj/kernel",
    "model.layers.{i}.self_attn.o_proj.weight": "layers/attn/o_proj/kernel",
    "model.layers.{i}.mlp.gate_proj.weight": "layers/mlp/gate_proj/kernel",
    "model.layers.{i}.mlp.up_proj.weight": "layers/mlp/up_proj/kernel",
    "model.layers.{i}.mlp.down_proj.weight": "layers/mlp/down_proj/kernel",
    "model.layers.{i}.input_layernorm.weight": "layers/attn_norm/scale",
    "model.layers.{i}.post_attention_layernorm.weight": "layers/mlp_norm/scale",
}


def dump(out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    folder = os.environ["SMOLLM2_DIR"]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME, dtype=torch.float32)
    sd = model.state_dict()
    arrays = {
        "model.embed_tokens.weight": sd["model.embed_tokens.weight"].numpy(),
        "model.norm.weight": sd["model.norm.weight"].numpy(),
    }
    for i in LAYERS:
        for k in PAIRS:
            arrays[k.format(i=i)] = sd[k.format(i=i)].numpy()
    np.savez(out, **arrays)
    print("wrote", out, len(arrays), "tensors")


def compare(ref_path: str) -> None:
    from jaxlora.io import load_model

    ref = np.load(ref_path)
    params = load_model("smollm2-135m-instruct").params

    def get(path):
        node = params
        for k in path.split("/"):
            node = node[k]
        return np.asarray(node)

    rows = [
        ("model.embed_tokens.weight", get("embed/embedding")),
        ("model.norm.weight", get("final_norm/scale")),
    ]
    for i in LAYERS:
        for k, p in PAIRS.items():
            w = get(p)[i]
            rows.append((k.format(i=i), w.T if w.ndim == 2 else w))
    worst = 0.0
    for name, mine in rows:
        diff = float(np.max(np.abs(mine - ref[name])))
        worst = max(worst, diff)
        print(f"{name:50s} {list(mine.shape)!s:14s} max|diff| = {diff:.3g}")
    print("worst", worst)


if __name__ == "__main__":
    {"dump": dump, "compare": compare}[sys.argv[1]](sys.argv[2])
