#!/usr/bin/env bash
# Issue 11 on one GPU: the quantized Triton kernels' tests natively, then batch-1 decode of dbrx-132b with 2 layers
# in bf16, int8 and int4 (random weights, quantized in memory on the GPU).
# Usage: bash benchmarks/run_gpu_quant.sh   [PYTHON=python3 OUT=dir]; writes $OUT (default ./bench-out-quant).
set -u
cd "$(dirname "$0")/.."
dir="${OUT:-./bench-out-quant}"
mkdir -p "$dir"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout -k 10 240 "$PY" -m pytest -o addopts="" -q -rfE -p no:cacheprovider tests/test_quant_triton.py \
  > "$dir/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -n 1 "$dir/gpu_tests.log"))" >&2
for args in "--dtype bf16" "--bits 8" "--bits 4"; do
  # shellcheck disable=SC2086
  timeout -k 10 150 "$PY" -m dbrx bench decode --device cuda --preset dbrx-132b --override n_layers=2 \
    --prompt-len 64 --new-tokens 64 --rounds 3 $args >> "$dir/decode.jsonl" 2>> "$dir/decode.log"
  echo "decode $args: exit $?" >&2
done
tail -n 3 "$dir/decode.jsonl"
