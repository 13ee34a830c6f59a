"""Step 2 (scratch venv with torch, transformers, peft -- NOT a jaxlora dependency).

    /tmp/scratch/bin/python benchmarks/parity/peft_torch_check.py --dir /tmp/peft_parity

For each case written by peft_jax_export.py:
  a) loads base + jaxlora's PEFT adapter with `PeftModel.from_pretrained`, compares logits
     with jaxlora's adapter forward (jax_logits.npy);
  b) the reverse: makes a random PEFT adapter in torch (init_lora_weights=False so B != 0),
     saves it to <case>/torch_adapter and its logits to torch_logits.npy for peft_jax_import.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

TORCH_TARGETS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], r=6, lora_alpha=12,
                  rank_pattern={"gate_proj": 3}, alpha_pattern={"q_proj": 5}),
    "llama-rslora": dict(target_modules=["k_proj", "o_proj", "up_proj"], r=4, lora_alpha=3,
                         use_rslora=True),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=16,
                 fan_in_fan_out=True),
    "llama-dora": dict(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"], r=6,
                       lora_alpha=12, use_dora=True),
    "gpt2-dora": dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=16,
                      fan_in_fan_out=True, use_dora=True),
}


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/peft_parity")
    args = ap.parse_args()
    root = Path(args.dir)
    tokens = np.load(root / "tokens.npy")
    results = {}
    for case in json.loads((root / "cases.json").read_text()):
        d = root / case
        base = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32).eval()
        base_logits = logits(base, tokens)
        jb = np.load(d / "jax_base_logits.npy")
        model = PeftModel.from_pretrained(base, d / "adapter").eval()
        got = logits(model, tokens)
        ref = np.load(d / "jax_logits.npy")
        r = {
            "base_max_abs_diff": float(np.abs(base_logits - jb).max()),
            "jax_to_peft_max_abs_diff": float(np.abs(got - ref).max()),
            "jax_to_peft_max_rel_diff": rel(got, ref),
            "adapter_effect_max_abs": float(np.abs(ref - jb).max()),
        }
        # reverse: a PEFT adapter made here, loaded by peft_jax_import.py
        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32).eval()
        cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **TORCH_TARGETS[case])
        pm = get_peft_model(fresh, cfg).eval()
        if cfg.use_dora:  # PEFT sets m = ||W + s B A||_c; move it so the magnitude matters too
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_magnitude_vector" in name:
                        p.mul_(1 + 0.2 * torch.randn_like(p))
        pm.save_pretrained(d / "torch_adapter")
        np.save(d / "torch_logits.npy", logits(pm, tokens))
        results[case] = r
        print(case, json.dumps(r))
    (root / "torch_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
