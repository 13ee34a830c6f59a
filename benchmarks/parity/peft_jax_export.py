"""Step 1 (project venv): write HF base folders, PEFT adapters and jaxlora logits to --dir.

    .venv/bin/python benchmarks/parity/peft_jax_export.py --dir /tmp/peft_parity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from peft_common import byte_tokenizer, random_adapters, random_base, tiny_config  # noqa: E402

from jaxlora import lora  # noqa: E402
from jaxlora.io import save_hf  # noqa: E402
from jaxlora.io.peft import save_peft  # noqa: E402
from jaxlora.models import forward  # noqa: E402

SPECS = {
    "llama": lora.LoraSpec(rank=8, alpha=16, targets="all-linear",
                           rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 32}),
    "llama-rslora": lora.LoraSpec(rank=8, alpha=4, scaling="rslora",
                                  targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "gpt2": lora.LoraSpec(rank=4, alpha=8, targets=r"^layers/.*/(c_attn|c_proj|c_fc)/kernel$"),
    "llama-dora": lora.LoraSpec(rank=8, alpha=16, targets="all-linear", method="dora",
                                rank_pattern={"down_proj": 4}),
    "gpt2-dora": lora.LoraSpec(rank=4, alpha=8, targets=r"^layers/.*/(c_attn|c_proj|c_fc)/kernel$",
                               method="dora"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/peft_parity")
    args = ap.parse_args()
    root = Path(args.dir)
    tok, vocab = byte_tokenizer()
    tokens = np.random.default_rng(7).integers(3, vocab, (2, 12)).astype(np.int32)
    cases = {}
    for case, spec in SPECS.items():
        arch = case.split("-")[0]
        cfg = tiny_config(arch, vocab)
        base = random_base(cfg)
        ad = random_adapters(base, spec)
        d = root / case
        save_hf(d / "base", cfg, base, tok, dtype="float32")
        save_peft(d / "adapter", ad, spec, base_model_name=str(d / "base"), arch=cfg)
        fwd = jax.jit(lambda p, t, a, cfg=cfg: forward(cfg, p, t, adapters=a))
        np.save(d / "jax_logits.npy", np.asarray(fwd(base, jnp.asarray(tokens), ad)))
        np.save(d / "jax_base_logits.npy",
                np.asarray(jax.jit(lambda p, t, cfg=cfg: forward(cfg, p, t))(base, jnp.asarray(tokens))))
        cases[case] = arch
    np.save(root / "tokens.npy", tokens)
    (root / "cases.json").write_text(json.dumps(cases))
    print(f"wrote {', '.join(cases)} to {root}")


if __name__ == "__main__":
    main()
