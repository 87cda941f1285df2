#!/usr/bin/env bash
# Issue 4 benchmarks on one GPU: dbrx vs transformers' DbrxForCausalLM, same config, weights and process.
# Usage (from the repo root): bash benchmarks/run_gpu.sh      -> JSON lines in $OUT/bench.jsonl or ./bench-out/
# Each run is a separate process, so one failure (e.g. out of memory) does not stop the others.
set -u
cd "$(dirname "$0")/.."
dir="${OUT:-./bench-out}"
mkdir -p "$dir"
log="$dir/bench.jsonl"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c 'import json, torch, triton, transformers; print(json.dumps({"env": True, "torch": torch.__version__,
"triton": triton.__version__, "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(0),
"grouped_mm": hasattr(torch, "_grouped_mm")}))' | tee -a "$log"

bench() {  # bench NAME ARGS...
  local name=$1; shift
  echo "== $name: dbrx bench $*" >&2
  if ! "$PY" -m dbrx bench "$@" > "$dir/$name.json" 2> "$dir/$name.err"; then
    echo "{\"run\": \"$name\", \"error\": $("$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()[-2000:]))' < "$dir/$name.err")}" \
      | tee -a "$log"
    return
  fi
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); r["run"]=sys.argv[2]; print(json.dumps(r))' \
    "$dir/$name.json" "$name" | tee -a "$log"
}

R132="--preset dbrx-132b --override n_layers=2 --dtype bf16"
R9="--preset dbrx-9b --override n_layers=4 --dtype bf16"
# targets: train >= 500 TFLOP/s (transformers 248) at <= transformers' peak memory; prefill >= 650 (423)
bench train_132b_l2_4x2048_compile      train   $R132 --batch 4 --seq-len 2048 --compile --steps 5 --warmup 3 --compare transformers
bench prefill_132b_l2_1x2048_compile    prefill $R132 --batch 1 --seq-len 2048 --compile --steps 10 --warmup 3 --compare transformers
# without compile, other expert backends and checkpointing variants
bench train_132b_l2_4x2048_eager        train   $R132 --batch 4 --seq-len 2048 --no-compile --steps 5 --warmup 2
bench train_132b_l2_4x2048_triton       train   $R132 --batch 4 --seq-len 2048 --compile --backend triton --steps 5 --warmup 3
bench train_132b_l2_4x2048_selective    train   $R132 --batch 4 --seq-len 2048 --compile --checkpointing selective --steps 5 --warmup 3
bench train_132b_l2_4x2048_full         train   $R132 --batch 4 --seq-len 2048 --compile --checkpointing full --steps 5 --warmup 3
bench prefill_132b_l2_1x2048_eager      prefill $R132 --batch 1 --seq-len 2048 --no-compile --steps 10 --warmup 3
bench prefill_132b_l2_1x2048_triton     prefill $R132 --batch 1 --seq-len 2048 --compile --backend triton --steps 10 --warmup 3
# dbrx-9b, 4 layers, batch 8 x 4096
bench train_9b_l4_8x4096_compile        train   $R9 --batch 8 --seq-len 4096 --compile --steps 5 --warmup 3 --compare transformers
bench prefill_9b_l4_8x4096_compile      prefill $R9 --batch 8 --seq-len 4096 --compile --steps 5 --warmup 3 --compare transformers
echo "results: $log" >&2
