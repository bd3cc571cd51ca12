#!/usr/bin/env bash
# Issue 25 (offloaded generation) on one GPU, one call of at most 10 minutes, run from the repository root on the
# device; nothing to carry. llama-8b (random bf16 weights, 16 GB) under an 8 GiB device budget, prompt 512:
#   bash tools/issue25_offload_gpu.sh                 # part 1 (about 5 minutes)
#   PARTS="bf16" bash tools/issue25_offload_gpu.sh     # part 2 (HF's offload takes minutes to load and run)
#   GEN_LENS=32 METHODS=ours,layer_by_layer bash tools/issue25_offload_gpu.sh   # part 1, shorter
# carry .whl (gguf: llmjax.io imports it).
# 1. ours with the cost model's batch, int4 host weights and the int8 KV cache, against the layer-by-layer baseline
#    at its best batch (the largest the budget holds) and all on the device, outputs 32 and 128; a profile of one
#    more 8-token run of ours -> the copy / compute overlap and a timeline (tools/offload_overlap.py);
# 2. ours with the model's own bf16 weights and cache (no quantization), the baseline at batch 1 and HF
#    transformers' device_map="auto" offload at the baseline's batch, output 32.
# JSON + PNG of each come back under $OUT, and the profile's trace where it is under 16 MB.
set -uo pipefail
source "$(dirname "$0")/gpu_budget.sh"
UNTIL=${UNTIL:-$(( $(date +%s) + 585 ))}  # set by a caller sharing the call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100
mkdir -p "${OUT:=runs}"
nvidia-smi --query-gpu=name --format=csv,noheader
common=(--model llama-8b --compute-dtype bfloat16 --gpu-memory 8GiB --prompt-len 512 --batch auto)
[[ " ${PARTS:-int4} " == *" int4 "* ]] && timeout "$(budget 580)" python3 -m experiments bench_offload "${common[@]}" --host-quant int4 --cache-int8 \
    --gen-lens "${GEN_LENS:-32,128}" --methods "${METHODS:-ours,layer_by_layer,all_on_device}" --out "$OUT/offload-int4.json" \
    --profile /tmp/offload-trace 2>&1 | grep -v "^WARNING"
if [[ " ${PARTS:-int4} " == *" int4 "* ]]; then
    python3 tools/offload_overlap.py /tmp/offload-trace "$OUT/offload-overlap.png" 200
    trace=$(ls /tmp/offload-trace/plugins/profile/*/*.trace.json.gz 2>/dev/null | tail -1)
    [ -n "$trace" ] && (( $(stat -c %s "$trace") < 16000000 )) && cp "$trace" "$OUT/offload-trace.json.gz"
fi
[[ " ${PARTS:-int4} " == *" bf16 "* ]] && timeout "$(budget 580)" python3 -m experiments bench_offload "${common[@]}" --gen-lens 32 \
    --methods ours,layer_by_layer_batch1,hf_device_map_auto --out "$OUT/offload-bf16.json" 2>&1 | grep -v "^WARNING"
