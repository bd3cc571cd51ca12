#!/usr/bin/env bash
# Issue 10's GPU checks and figures in one device call; logs and JSON under $OUT.
#   STEPS="bench tests remat train quantize" OUT=/tmp/q bash tools/quant_gpu_check.sh
# bench:    fused int8 / int4 / nf4 matmul vs bf16 at decode and prefill shapes (+ batch-1 tile sweep), alone on the GPU
# remat:    llama-1b memory per mode x remat policy, 3 real steps each  } run side by side (no timings reported
# tests:    pytest -m gpu over the kernel, quant and peft tests         } from them; GPU preallocation off)
# train:    gpt2-124m, TRAIN_STEPS (2000: 95 s), on the stdlib (32768-id BPE, } carried: runs/tokenizer/bpe-32768.json)
# quantize: float / int8 / int4-RTN / int4-GPTQ / NF4 on that checkpoint, decode through the fused kernel, alone
#           (GPTQ of gpt2-124m took 112 s on the H200: QUANTIZE_LIMIT seconds, 420 by default)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/quant_gpu}
PY=${PY:-python3}
STEPS=${STEPS:-"bench tests remat train quantize"}
TRAIN_STEPS=${TRAIN_STEPS:-2000}
QUANTIZE_LIMIT=${QUANTIZE_LIMIT:-420}
mkdir -p "$OUT"
start=$(date +%s)
note() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/steps.log"; }
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  note "start $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  note "end $name (exit $?)"
  grep -v "Warning\|warn(" "$OUT/$name.log" | tail -n "${TAIL:-25}"
}

note "$(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null)"
if wanted bench; then
  run bench 200 $PY -m experiments bench_matmul_quant ${BENCH_ARGS:---sweep} --out "$OUT/bench_matmul_quant.json"
fi

background=""
if wanted remat; then
  note "start remat (background)"
  ( XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 $PY -m experiments remat_memory --model llama-1b --batch 4 --seq 1024 --policies none,full,offload \
      --modes full,lora,qlora --measure-steps 3 --jobs 3 --out "$OUT/remat_memory_llama-1b.json" \
      > "$OUT/remat.log" 2>&1; note "end remat (exit $?)" ) &
  background=$!
fi
tests_job=""
if wanted tests; then  # side by side with training: no timings are taken in either
  note "start tests (background)"
  ( XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider \
      ${TEST_PATHS:-tests/kernels/test_matmul_quant.py tests/quant tests/peft} > "$OUT/tests.log" 2>&1
    note "end tests (exit $?)" ) &
  tests_job=$!
fi
if wanted train; then
  # the device has no tensorboardX (llmjax.train.loop imports it): a do-nothing SummaryWriter for this run only
  if ! $PY -c "import tensorboardX" 2>/dev/null; then
    mkdir -p /tmp/shim/tensorboardX
    printf 'class SummaryWriter:\n    def __init__(self, *a, **k): pass\n    def __getattr__(self, name): return lambda *a, **k: None\n' \
      > /tmp/shim/tensorboardX/__init__.py
  fi
  # fresh folders: a machine kept warm between calls still has the last call's shards and run (and resuming a run
  # whose config has changed since is refused)
  rm -rf /tmp/tok /tmp/run-gpt2-124m
  run tokenize 60 $PY -m experiments tokenize --tokenizer runs/tokenizer/bpe-32768.json --out /tmp/tok --no-progress \
    --validation-fraction 0.05
  PYTHONPATH=.:/tmp/shim XLA_PYTHON_CLIENT_PREALLOCATE=false run train 200 $PY -m experiments train --model gpt2-124m \
    --data /tmp/tok --run-dir /tmp/run-gpt2-124m --batch 16 --seq 1024 --steps "$TRAIN_STEPS" --warmup 40 --lr 1e-3 \
    --eval-every "$TRAIN_STEPS" --save-every "$TRAIN_STEPS" --log-every 50 --eval-batches 4 --no-progress
  cp /tmp/run-gpt2-124m/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
fi
for job in $background $tests_job; do wait "$job"; done
[ -n "$background" ] && grep -v "Warning\|warn(" "$OUT/remat.log" | tail -n 16
[ -n "$tests_job" ] && grep -v "Warning\|warn(" "$OUT/tests.log" | grep -v "^  \|^$" | tail -n 25
if wanted quantize; then
  run quantize "$QUANTIZE_LIMIT" $PY -m experiments quantize --ckpt /tmp/run-gpt2-124m --data /tmp/tok --matmul pallas \
    ${QUANTIZE_ARGS:-} --out "$OUT/quantize_gpt2-124m_pallas.json"
  # the XLA matmul only when the fused kernel failed before its first row (not when the time limit cut a late row)
  grep -q "perplexity" "$OUT/quantize.log" || run quantize_xla_fallback 150 $PY -m experiments quantize \
    --ckpt /tmp/run-gpt2-124m --data /tmp/tok --matmul xla ${QUANTIZE_ARGS:-} --out "$OUT/quantize_gpt2-124m_xla.json"
fi
if wanted quantize_xla; then
  run quantize_xla 150 $PY -m experiments quantize --ckpt /tmp/run-gpt2-124m --data /tmp/tok --matmul xla \
    --decode-formats float,int4-RTN,nf4 --out "$OUT/quantize_gpt2-124m_xla.json"
fi
note "done"
