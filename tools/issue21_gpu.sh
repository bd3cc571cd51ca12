#!/usr/bin/env bash
# Issue 21 on one GPU (FP8 training, attention against cuDNN and tokamax), one part per call (each fits the
# 10-minute limit; runs/ stays while the machine is warm). Run from the repository root on the device:
#   bash tools/issue21_gpu.sh data                          # a 16k BPE tokenizer and token shards of the stdlib
#                                                           # (or make them here and carry .fp8data: see DATA)
#   bash tools/issue21_gpu.sh loss MODEL STEPS PRECISION... # MODEL trained STEPS steps in each precision (bf16, fp8,
#                                                           # fp8-delayed) from one seed and data, then compare_runs
#   bash tools/issue21_gpu.sh speed                         # the FP8 GEMM probe, bench_train (llama-1b in every
#                                                           # precision; GPT-2 124M beside the torch peer), GPU tests
#   bash tools/issue21_gpu.sh attention                     # the FP8 attention GPU tests; bench_attention at the
#                                                           # headline shapes and 16k with tokamax and the FP8
#                                                           # forwards (ours, cuDNN's): carry .whl_tokamax (tokamax 0.0.17 and what it
#                                                           # needs beyond the image; xprof, imported by its own
#                                                           # benchmarking only, is stubbed: the registry's is too old)
# Batch sizes: llama-125m 16 x 1024, llama-1b 8 x 1024 (1,000 steps: 16M and 8M tokens, about 1 and 2 minutes on an H100).
# Logs, metrics, plots and JSON are packed into $OUT/PART.tgz (no checkpoints).
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LLMJAX_FLASH_AUTOTUNE=0
RUNS=runs/fp8 LOGS=/tmp/fp8_logs DATA=/tmp/fp8_data
# Token shards made on the host by the same two commands as `data` (out .fp8data/bpe-16384.json, .fp8data/tokens)
# and carried are used when present.
[ -f .fp8data/tokens/train/index.json ] && DATA=.fp8data/tokens
mkdir -p "$RUNS" "$LOGS" "${OUT:=runs}"
pack() {  # logs, metrics, plots and JSON of every run (no checkpoints)
    for run in "$RUNS"/*/; do
        [ -d "$run" ] || continue
        name=$(basename "$run"); mkdir -p "$LOGS/$name"
        cp "$run"/*.jsonl "$run"/*.json "$run"/*.png "$LOGS/$name/" 2>/dev/null
    done
    tar czf "$OUT/$1.tgz" -C /tmp fp8_logs
}
trap 'pack "${1:-none}"' EXIT
x() {  # x LOG SECONDS ARGS...: one experiment, its log under $LOGS
    local log=$1 seconds=$2; shift 2
    echo "=== $log: $*" | tee -a "$LOGS/$log.log"
    timeout "$seconds" python3 -m experiments "$@" >> "$LOGS/$log.log" 2>&1
    echo "=== $log: exit $? at ${SECONDS}s"; grep -vE "^\s*$" "$LOGS/$log.log" | tail -4
}
precision_flags() {  # bf16 | fp8 | fp8-delayed -> the --set flags of that precision
    case "$1" in
        bf16) echo "--set matmul_precision=bf16" ;;
        fp8) echo "--set matmul_precision=fp8 --set fp8_scaling=current" ;;
        fp8-delayed) echo "--set matmul_precision=fp8 --set fp8_scaling=delayed" ;;
        *) echo "unknown precision $1 (bf16, fp8, fp8-delayed)" >&2; exit 2 ;;
    esac
}

case "${1:-}" in
data)
    x tokenizer 300 tokenizer --vocab-size 16384 --skip-hf --out /tmp/fp8_tokenizer/bpe-16384.json
    x tokenize 300 tokenize --tokenizer /tmp/fp8_tokenizer/bpe-16384.json --out "$DATA" --no-progress ;;
loss)
    model=${2:?model}; steps=${3:?steps}; shift 3
    case "$model" in llama-1b) shape=(--batch 8 --seq 1024) ;; *) shape=(--batch 16 --seq 1024) ;; esac
    runs=()
    for precision in "$@"; do
        # shellcheck disable=SC2046
        x "$model-$precision" 580 train --model "$model" --data "$DATA" $(precision_flags "$precision") "${shape[@]}" \
            --steps "$steps" --warmup 100 --lr 6e-4 --eval-every 100 --eval-batches 16 --save-every "$steps" \
            --sample-tokens 0 --seed 0 --run-dir "$RUNS/$model-$precision" --no-progress
        runs+=("$RUNS/$model-$precision")
    done
    x "compare-$model" 120 compare_runs "${runs[@]}" --labels "$(IFS=,; echo "$*")" --out "$RUNS/compare-$model" ;;
speed)
    timeout 120 python3 -m pytest -q -m gpu tests/nn/test_fp8.py tests/train/test_step_metrics_gpu.py \
        -p no:cacheprovider > "$LOGS/gpu-tests.log" 2>&1; tail -3 "$LOGS/gpu-tests.log"
    timeout 120 python3 tools/fp8_probe.py > "$LOGS/fp8-probe.log" 2>&1; cat "$LOGS/fp8-probe.log"
    x bench-llama-1b 300 bench_train --model llama-1b --vocab 128256 --batch 8 --seq 2048 --precision all --no-torch \
        --steps 10 --warmup 2 --check-steps 0 --out "$RUNS/bench-llama-1b"
    x bench-gpt2 300 bench_train --model gpt2-124m --batch 16 --seq 1024 --precision all --steps 20 --warmup 3 \
        --check-steps 0 --out "$RUNS/bench-gpt2" ;;
attention)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_tokamax/*.whl
    mkdir -p /tmp/site/xprof/cli && touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
    echo "get_kernel_stats_tool = None" > /tmp/site/xprof/cli/tools.py
    export PYTHONPATH=$PYTHONPATH:/tmp/site
    timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_flash_attention_mosaic.py -k fp8 -p no:cacheprovider \
        > "$LOGS/fp8-attention-tests.log" 2>&1; tail -3 "$LOGS/fp8-attention-tests.log"
    # the headline shapes (b4 s4096 h16 d128 causal, MHA and GQA) come first, then b1 s16384 h16 d128; the FP8
    # forwards (ours and cuDNN's) beside the bf16 ones
    x attention 450 bench_attention --seqs 16384 --tokens 16384 --head-dims 128 --repeats 10 \
        --impls pallas cudnn tokamax torch pallas_fp8 cudnn_fp8 --out "$RUNS/attention/attention.json" ;;
*)
    echo "usage: bash tools/issue21_gpu.sh data | loss MODEL STEPS PRECISION... | speed | attention" >&2; exit 2 ;;
esac
