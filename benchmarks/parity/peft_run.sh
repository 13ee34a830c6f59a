#!/usr/bin/env bash
# PEFT parity: jaxlora <-> huggingface/peft on tiny random models (CPU, ~1 minute).
# Needs a *scratch* venv with torch, transformers and peft (not a jaxlora dependency):
#   SCRATCH=/tmp/scratch bash benchmarks/parity/peft_run.sh [/tmp/peft_parity]
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-/tmp/peft_parity}
SCRATCH=${SCRATCH:-/tmp/scratch}
rm -rf "$DIR"
${VENV:-.venv}/bin/python benchmarks/parity/peft_jax_export.py --dir "$DIR"
"$SCRATCH/bin/python" benchmarks/parity/peft_torch_check.py --dir "$DIR"
${VENV:-.venv}/bin/python benchmarks/parity/peft_jax_import.py --dir "$DIR"
echo "results: $DIR/results.json"
