#!/usr/bin/env bash
# One prepared GPU check (issue "Performance at scale"): run it on a lent GPU machine in one call, under
# 10 minutes, then give the machine back. Writes $OUT/gpu_check.json (+ the logs beside it):
#   1. the GPU test suite (MEGATRON_JAM_TEST_GPU=1: bf16 train + exact resume, distributed-optimizer resume,
#      bf16 weights-only load, generation from bf16, TE specs when TE is installed)
#   2. training throughput at a 7B-parent-shaped slice (d 4096, 32 heads, 8 query groups, FFN 14,336, a few
#      layers, seq 4096, bf16): JAM-Cross and JAM-Uniform with SDPA vs Megatron's unfused attention, and a bare
#      Megatron-Core GPTModel of the parent shape (MFU on 989 TFLOP/s)
#   3. JAM-Cross activation memory and step time with and without recomputation at that shape
#   4. decode speed (KV cache, batched CFG) of benchmarks/bench_generation.py, eager vs static vs CUDA-graph
#      decode steps against the weight-read bound: a small fp32 model (launch-bound) and a ~1.6 GB bf16 one
# Set-up on the machine (no network): megatron-core travels as a wheel in .whl (docs/gpu.md):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl megatron-core==0.16.1
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590)
# GPU_CHECK_SMALL=1 runs every step at toy sizes (a CPU dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
[ -f megatron_jam/_C*.so ] || $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1

if [ "${GPU_CHECK_SMALL:-0}" = 1 ]; then
  SHAPE=(--hidden-size 64 --num-layers 2 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 128)
  SEQ=128; GEN=(--hidden 64 --layers 2 --tokens-per-image 16 --codebook 64 --cfg-tokens 16); PRECISION=()
  GEN_BIG=(--hidden 96 --layers 2 --heads 4 --tokens-per-image 16 --codebook 64 --cfg-tokens 8 --skip-no-cache)
else
  SHAPE=(--hidden-size 4096 --num-layers 2 --num-attention-heads 32 --num-query-groups 8 --ffn-hidden-size 14336)
  SEQ=4096; GEN=(--tokens-per-image 256 --cfg-tokens 64); PRECISION=(--bf16)
  GEN_BIG=(--hidden 2048 --layers 8 --heads 16 --bf16 --tokens-per-image 256 --cfg-tokens 32 --skip-no-cache)
fi
status() { echo "{\"step\": \"$1\", \"exit_code\": $2, \"seconds\": $3}" >> "$OUT/steps.jsonl"; }
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record the exit code and the time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  status "$name" "$rc" $((SECONDS - t0))
  tail -5 "$OUT/$name.log"
}
rm -f "$OUT/steps.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

step gpu_tests 180 env MEGATRON_JAM_TEST_GPU=1 $PY -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_specs.py
step throughput 170 $PY benchmarks/bench_training_throughput.py "${SHAPE[@]}" "${PRECISION[@]}" \
    --seq-length "$SEQ" --micro-batch-size 1 --global-batch-size 2 --vocab-size 32000 --iters 6 --warmup 2 \
    --methods cross,uniform --attention-backends auto,unfused --baseline --peak-tflops 989 \
    --json "$OUT/throughput.json"
step recompute 100 $PY benchmarks/bench_recompute.py "${SHAPE[@]}" "${PRECISION[@]}" --seq-length "$SEQ" \
    --micro-batch-size 1 --vocab-size 32000 --iters 3 --json "$OUT/recompute.json"
step decode 60 $PY benchmarks/bench_generation.py "${GEN[@]}"
step decode_big 80 $PY benchmarks/bench_generation.py "${GEN_BIG[@]}"

$PY - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
summary = {"gpu": open(os.path.join(out, "gpu.txt")).read().strip(),
           "steps": [json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))],
           "throughput": load("throughput.json"), "recompute": load("recompute.json"),
           "gpu_tests_tail": open(os.path.join(out, "gpu_tests.log")).read().splitlines()[-3:],
           "decode_log": open(os.path.join(out, "decode.log")).read().splitlines()[-40:],
           "decode_big_log": open(os.path.join(out, "decode_big.log")).read().splitlines()[-40:]}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print("wrote", os.path.join(out, "gpu_check.json"), "steps:", [(s["step"], s["exit_code"]) for s in summary["steps"]])
PY
