"""The peers' training step on SmolLM2-135M: PEFT LoRA and PEFT + bitsandbytes QLoRA (CPU).

Runs in a scratch virtualenv that has torch, transformers, peft and bitsandbytes -- never in
the project's environment. It loads the Hugging Face folder that jaxlora writes from the same
GGUF (`jaxlora.io.save_hf`), so both sides train the very same weights:

    .venv/bin/python -c "from jaxlora import io; m = io.load_model('smollm2-135m-instruct'); \
        io.save_hf('/tmp/smollm2-hf', m.config, m.params, m.tokenizer)"
    /tmp/scratch/bin/python benchmarks/peers/peft_train.py /tmp/smollm2-hf --variant lora

Prints one JSON line: variant, median step seconds, tokens/s, peak RSS (MB). Batch 4 x 256,
r=8, alpha=16, q/k/v/o/gate/up/down, float32, AdamW, random tokens (as in
shared/reference/baselines.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--variant", choices=("lora", "qlora"), default="lora")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    kw = {"dtype": torch.float32}
    if args.variant == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(args.folder, **kw)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))

    def step() -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    s = times[len(times) // 2]
    print(json.dumps({
        "variant": f"peft-{args.variant}", "step_s": s, "tokens_per_s": args.batch * args.seq / s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
