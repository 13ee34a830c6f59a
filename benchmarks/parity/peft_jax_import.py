"""Step 3 (project venv): load the PEFT adapters made in torch into jaxlora, compare logits.

    .venv/bin/python benchmarks/parity/peft_jax_import.py --dir /tmp/peft_parity
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.io import load_model
from jaxlora.io.peft import load_peft
from jaxlora.models import forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/peft_parity")
    args = ap.parse_args()
    root = Path(args.dir)
    tokens = jnp.asarray(np.load(root / "tokens.npy"))
    results = json.loads((root / "torch_results.json").read_text())
    for case in json.loads((root / "cases.json").read_text()):
        d = root / case
        m = load_model(d / "base")
        ad = load_peft(d / "torch_adapter", m.params, m.config)
        got = np.asarray(jax.jit(lambda p, t, a, c=m.config: forward(c, p, t, adapters=a))(m.params, tokens, ad))
        ref = np.load(d / "torch_logits.npy")
        jb = np.load(d / "jax_base_logits.npy")
        results[case].update({
            "peft_to_jax_max_abs_diff": float(np.abs(got - ref).max()),
            "peft_to_jax_max_rel_diff": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "torch_adapter_effect_max_abs": float(np.abs(ref - jb).max()),
        })
        print(case, json.dumps(results[case]))
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
