#!/usr/bin/env bash
# Issue 27: stage-2 variants on the tower and LM of one full run, in one device call of at most 10 minutes (each
# variant about 3.5 minutes at 4,500 steps: stage 2, evaluation; stages 0 and 1 reused by --lm-ckpt / --vision-from;
# VARIANT_S caps each, 240 s by default); carry .whl.
#   bash tools/issue27_variants_gpu.sh          # the base run, then --latents 32 on its tower
#   VARIANTS="--latents 32;--latents 64" bash tools/issue27_variants_gpu.sh
#   BASE_FLAGS="--colour-swap 0.5" VARIANTS= bash tools/issue27_variants_gpu.sh   # the base run alone, with these flags
#   UNTIL=$(( $(date +%s) + 425 )) VARIANT_S=420 VARIANTS="--steps 6500" bash tools/issue27_variants_gpu.sh
# The base run (tools/issue27_gpu.sh's command, stages 0-2) goes first unless BASE (runs/vlm-base) already holds
# one: runs/ is git-ignored, so a second call on the same warm machine reuses the first call's base.
# Each variant's report comes back as $OUT/vlm-variant-N-report.json, and a summary line per run is printed.
set -uo pipefail
source "$(dirname "$0")/gpu_budget.sh"
UNTIL=${UNTIL:-$(( $(date +%s) + 585 ))}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "${OUT:=runs}"
nvidia-smi --query-gpu=name --format=csv,noheader
data=(--workers 16 --image-size 72 --grid 3 --max-objects 4 --train-images 20000 --seq-len 160)
stage2=(--latents 16 --resampler-layers 2 --xattn-every 1 --steps 4500 --batch 64 --episode-batch 16
        --eval-images 512 --eval-episodes 256 --eval-batch 128 --shots 0,4,8)
summary() {  # the report's held-out and validation attributes, on one line
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); c=r['captions']
print(sys.argv[2], *(f\"{s}: {c[s]['attribute_accuracy']:.1%} ({c[s]['colour']:.1%} / {c[s]['shape']:.1%} / {c[s]['count']:.1%})\" for s in ('heldout', 'validation')), f\"text {r['text_loss']['relative_change']:+.2%}\")" "$1" "$2"
}
BASE=${BASE:-runs/vlm-base}
# shellcheck disable=SC2086
if [ ! -f "$BASE/report.json" ]; then
    timeout "$(budget 360)" python3 -m experiments train_vlm --out "$BASE" "${data[@]}" --vision-width 192 \
        --vision-layers 4 --patch-size 8 --clip-steps 1500 --clip-batch 256 --lm-preset gpt2-mini --lm-steps 800 \
        --lm-batch 64 "${stage2[@]}" ${BASE_FLAGS:-} > "$OUT/vlm-base.log" 2>&1
    [ -f "$BASE/report.json" ] && cp "$BASE/report.json" "$OUT/vlm-base-report.json" && summary "$BASE/report.json" "base ${BASE_FLAGS:-}"
fi
IFS=';' read -ra variants <<< "${VARIANTS---latents 32}"
for n in "${!variants[@]}"; do
    [ -z "${variants[$n]// /}" ] && continue
    run=runs/vlm-variant-$n
    # shellcheck disable=SC2086
    timeout "$(budget ${VARIANT_S:-240})" python3 -m experiments train_vlm --out "$run" "${data[@]}" --vision-from "$BASE" \
        --lm-ckpt "$BASE/lm" "${stage2[@]}" ${variants[$n]} > "$OUT/vlm-variant-$n.log" 2>&1
    [ -f "$run/report.json" ] && cp "$run/report.json" "$OUT/vlm-variant-$n-report.json" \
        && summary "$run/report.json" "variant $n (${variants[$n]})"
done
