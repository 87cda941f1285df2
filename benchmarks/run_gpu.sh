#!/usr/bin/env bash
# Issue 4 benchmarks on one GPU: dbrx vs transformers' DbrxForCausalLM, same config, weights and process.
# Usage (from anywhere): bash benchmarks/run_gpu.sh   [BUDGET_S=480 PYTHON=python3 OUT=dir]
# Writes four files to $OUT (or ./bench-out): gpu_tests.log, bench.jsonl (one JSON line per run), bench.log (every
# run's stderr) and summary.txt, which is also printed last. First the GPU correctness tests (pytest -m gpu: the
# grouped_mm and Triton backends against the loop reference in bf16 with empty experts, forward and backward;
# tiny-config logits against transformers; flex attention), then the runs in order of importance. Each run is a
# separate process under `timeout`, so a hang or an out-of-memory error costs only that run; runs that no longer
# fit in BUDGET_S seconds (whole script) are skipped and listed as such.
set -u
cd "$(dirname "$0")/.."
dir="${OUT:-./bench-out}"
mkdir -p "$dir"
jsonl="$dir/bench.jsonl"
log="$dir/bench.log"
: > "$jsonl"
: > "$log"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-480}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS

left() { echo $((BUDGET_S - (SECONDS - start))); }

record() {  # record NAME STATUS [MESSAGE]: a JSON line for a run that produced no report
  "$PY" -c 'import json, sys; print(json.dumps({"run": sys.argv[1], "error": sys.argv[2], "detail": sys.argv[3]}))' \
    "$1" "$2" "${3:-}" >> "$jsonl"
}

"$PY" - >> "$jsonl" 2>> "$log" <<'EOF'
import json, torch
env = {"run": "env", "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "grouped_mm": hasattr(torch, "_grouped_mm")}
for name in ("triton", "transformers"):
    try:
        env[name] = __import__(name).__version__
    except ImportError:
        env[name] = None
import dbrx.bench  # noqa: F401  the package imports on this machine
print(json.dumps(env))
EOF
[ $? -eq 0 ] && tail -n 1 "$jsonl" || echo "environment check failed: see $log" >&2

# ---- correctness on the GPU first, so that the numbers below can be trusted --------------------------------------
t=$(( $(left) < 180 ? $(left) : 180 ))
echo "== gpu tests (limit ${t}s)" >&2
timeout -k 10 "$t" "$PY" -m pytest -o addopts="" -v -m gpu -rfE -p no:cacheprovider tests/test_bench.py tests/test_experts.py \
  > "$dir/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -n 1 "$dir/gpu_tests.log"))" | tee -a "$log" >&2

bench() {  # bench NAME LIMIT_S ARGS...: one `dbrx bench` process, its JSON report tagged with NAME
  local name=$1 limit=$2 out rc t err
  shift 2
  t=$(( $(left) - 5 ))
  if [ "$t" -lt 45 ]; then record "$name" "skipped" "out of budget"; return; fi
  [ "$t" -gt "$limit" ] && t=$limit
  echo "== $name (limit ${t}s): dbrx bench $*" | tee -a "$log" >&2
  err=$(mktemp)
  out=$(timeout -k 10 "$t" "$PY" -m dbrx bench "$@" 2> "$err")
  rc=$?
  cat "$err" >> "$log"
  if [ $rc -ne 0 ] || [ -z "$out" ]; then
    record "$name" "exit $rc$([ $rc -eq 124 ] && echo ' (timeout)')" "$(tail -n 2 "$err" | cut -c1-300 | tr '\n' ' ')"
    rm -f "$err"
    return
  fi
  rm -f "$err"
  "$PY" -c 'import json, sys; r = json.loads(sys.argv[1]); r["run"] = sys.argv[2]; print(json.dumps(r))' \
    "$(tail -n 1 <<< "$out")" "$name" >> "$jsonl"
}

R132="--preset dbrx-132b --override n_layers=2 --dtype bf16"
R9="--preset dbrx-9b --override n_layers=4 --dtype bf16"
CMP="--compare transformers"
# targets: train >= 500 TFLOP/s (transformers 248) at <= transformers' peak memory; prefill >= 650 (423)
bench train_132b_4x2048       240 train   $R132 --batch 4 --seq-len 2048 --compile --steps 5 --warmup 3 $CMP
bench prefill_132b_1x2048     150 prefill $R132 --batch 1 --seq-len 2048 --compile --steps 10 --warmup 3 $CMP
bench train_9b_8x4096         180 train   $R9 --batch 8 --seq-len 4096 --compile --steps 5 --warmup 3 $CMP
bench prefill_9b_8x4096       120 prefill $R9 --batch 8 --seq-len 4096 --compile --steps 5 --warmup 3 $CMP
# the Triton backend (its logits checked against transformers in prefill), checkpointing variants, eager
bench prefill_132b_triton     150 prefill $R132 --batch 1 --seq-len 2048 --compile --backend triton --steps 10 --warmup 3 $CMP
bench train_132b_triton       180 train   $R132 --batch 4 --seq-len 2048 --compile --backend triton --steps 5 --warmup 3
bench train_132b_selective    150 train   $R132 --batch 4 --seq-len 2048 --compile --checkpointing selective --steps 5 --warmup 3
bench train_132b_full         150 train   $R132 --batch 4 --seq-len 2048 --compile --checkpointing full --steps 5 --warmup 3
bench train_132b_eager        100 train   $R132 --batch 4 --seq-len 2048 --no-compile --steps 5 --warmup 2
bench prefill_132b_eager       80 prefill $R132 --batch 1 --seq-len 2048 --no-compile --steps 10 --warmup 3
# the fake-tensor memory estimates of the same steps (seconds, on the CPU), to compare with the measured peaks
bench estimate_train_132b      60 train   $R132 --batch 4 --seq-len 2048 --estimate-memory
bench estimate_prefill_132b    60 prefill $R132 --batch 1 --seq-len 2048 --estimate-memory
bench estimate_train_9b        60 train   $R9 --batch 8 --seq-len 4096 --estimate-memory

# ---- summary (printed last, also in summary.txt) ----------------------------------------------------------------
"$PY" - "$jsonl" "$dir/gpu_tests.log" <<'EOF' | tee "$dir/summary.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
tests = [line.strip() for line in open(sys.argv[2]) if line.strip()]
env = next((r for r in rows if r.get("run") == "env"), {})
print("env:", {k: v for k, v in env.items() if k != "run"})
print("gpu tests:", tests[-1] if tests else "no output")
for line in [t for t in tests if " FAILED" in t or t.startswith(("FAILED", "ERROR"))][:12]:
    print("  ", line[:200])
def f(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"
print(f"{'run':24} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>5} {'peakGB':>7} | {'hf TFLOP/s':>10} {'hf GB':>6} "
      f"{'x speed':>7} {'x mem':>6} {'logit err':>9}  backend")
for r in rows:
    if r.get("run") == "env":
        continue
    if "error" in r:
        print(f"{r['run']:24} {r['error']}: {r.get('detail', '')[-160:]}")
        continue
    if "estimated_peak_memory_gb" in r:
        print(f"{r['run']:24} estimated peak {r['estimated_peak_memory_gb']:.1f} GB (eager, fake tensors)")
        continue
    hf = r.get("transformers", {})
    print(f"{r['run']:24} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {f(r['mfu'], 3):>5} {f(r['peak_memory_gb']):>7} | "
          f"{f(hf.get('tflops')):>10} {f(hf.get('peak_memory_gb')):>6} {f(r.get('ratio_tokens_per_s'), 2):>7} "
          f"{f(r.get('ratio_peak_memory'), 2):>6} {f(r.get('logits_rel_err'), 4):>9}  {r['expert_backend']}"
          f"{' ckpt=' + r['checkpointing'] if r['checkpointing'] != 'none' else ''}"
          f"{'' if r['compile'] else ' eager'}"
          f"{'  transformers: ' + hf['error'] if hf.get('error') else ''}")
EOF
echo "files: $dir (bench.jsonl bench.log gpu_tests.log summary.txt); $((SECONDS - start))s" >&2
