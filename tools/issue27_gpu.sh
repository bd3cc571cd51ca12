#!/usr/bin/env bash
# Issue 27 (Flamingo VLM) on one GPU, one call of at most 10 minutes, run from the repository root on the device;
# carry .whl (tensorboardX + protobuf + gguf for the train loop: the wheels tools/issue22_gpu.sh uses):
#   bash tools/issue27_gpu.sh            # docs/vlm.md's configuration: LM, CLIP, VLM stages, evaluation, report
#   EXTRA="--train-vision" bash tools/issue27_gpu.sh     # the same with the vision tower trained in the VLM stage
# 72-pixel images in a 3x3 grid: cells of 24 pixels, 3 x 3 patches of 8 each (the per-cell loss pools whole patches).
# report.json, loss.png and metrics.jsonl come back under $OUT (the run folder's checkpoints stay on the device).
set -uo pipefail
source "$(dirname "$0")/gpu_budget.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
RUN=runs/vlm-h100; mkdir -p "${OUT:=runs}"
nvidia-smi --query-gpu=name --format=csv,noheader
# shellcheck disable=SC2086
timeout "$(budget 570)" python3 -m experiments train_vlm --out "$RUN" --workers 16 \
    --image-size 72 --grid 3 --max-objects 4 --train-images 20000 --seq-len 160 \
    --vision-width 192 --vision-layers 4 --patch-size 8 --clip-steps 1500 --clip-batch 256 \
    --lm-preset gpt2-mini --lm-steps 800 --lm-batch 64 \
    --latents 16 --resampler-layers 2 --xattn-every 1 --steps 4500 --batch 64 --episode-batch 16 \
    --eval-images 512 --eval-episodes 256 --eval-batch 128 --shots 0,4,8 ${EXTRA:-} 2>&1 | tee "$OUT/train_vlm.log" \
    | tr "\r" "\n" | grep -Ev "^\s*$|step/s]|img/s]|it/s]" | tail -40
for f in report.json loss.png metrics.jsonl; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/vlm-$f"; done
