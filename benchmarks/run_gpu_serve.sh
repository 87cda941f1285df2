#!/usr/bin/env bash
# The serving issue's GPU target in one command: dbrx-9b, bf16, 64 requests of 512-token prompts and 128 output
# tokens, at most 32 in flight: `dbrx serve` (continuous batching, paged KV) against transformers' `generate` in
# static batches of 32 (and 4 requests one at a time), same weights, same process, same run.
# Usage: bash benchmarks/run_gpu_serve.sh [OUT=dir PYTHON=python3]   (needs ~20 GB of disk for the checkpoint)
# Writes $OUT/serve_gpu.json (the report) and $OUT/serve_gpu.log; targets: output tok/s >= 4x static-32 and
# dbrx serve's p99 TPOT < 30 ms (both flagged in the report).
set -eu
cd "$(dirname "$0")/.."
dir="${OUT:-./bench-out}"
mkdir -p "$dir"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ckpt="${CKPT:-/tmp/dbrx-9b-bf16}"
[ -f "$ckpt/config.json" ] || "$PY" -m dbrx init --preset dbrx-9b --dtype bf16 "$ckpt"
"$PY" -m pytest -q -o addopts="" -p no:cacheprovider tests/test_paged_triton.py tests/test_serve_engine.py \
    > "$dir/serve_gpu_tests.log" 2>&1 || echo "serving tests failed: see $dir/serve_gpu_tests.log" >&2
"$PY" benchmarks/serve_vs_transformers.py --model "$ckpt" --device cuda --dtype bf16 --num-prompts 64 \
    --input-len 512:512 --output-len 128:128 --max-concurrency 32 --sequential-requests 4 --server-args "--kv-memory 16GiB --max-num-batched-tokens 2048" \
    > "$dir/serve_gpu.json" 2> "$dir/serve_gpu.log"
tail -n 8 "$dir/serve_gpu.log"
