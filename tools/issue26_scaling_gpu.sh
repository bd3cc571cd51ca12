#!/usr/bin/env bash
# Issue 26 part 2 (IsoFLOP sweep, fits, the 10x check) on one GPU, run from the repository root on the device, as
# docs/scaling.md says: byte-level shards of the device's Python sources, then `experiments scaling --check` under a
# time budget. The run cache comes back as scaling-runs.tgz; if the log ends with "left to do", unpack it here
# (`tar xzf FILES_AT/scaling-runs.tgz`: it restores runs/scaling) and call again with carry ["runs/scaling"].
#   bash tools/issue26_scaling_gpu.sh              (no carry needed: the scaling code imports nothing optional)
# SWEEP_ARGS replaces the sweep's shape. Its default centres each budget's sizes on D/N = 80 tokens a parameter, the
# ratio session 15's first sweep found at these sizes (the Chinchilla 20 put the minima at the ladder's small edge).
set -uo pipefail
export PYTHONUNBUFFERED=1; mkdir -p "${OUT:=runs}"
STD=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvidia-smi --query-gpu=name --format=csv,noheader
CORPUS=("$STD/**/*.py")  # patterns, expanded by the tokenizer (recursive **), not by the shell
for p in numpy scipy jax sklearn torch transformers; do [ -d "$SITE/$p" ] && CORPUS+=("$SITE/$p/**/*.py"); done
SECONDS=0; python3 -m experiments tokenize --tokenizer bytes --no-progress --out runs/tokens/bytes-py \
    --corpus "${CORPUS[@]}" 2>&1 | tail -3; echo "tokenized in $SECONDS s"
SWEEP_ARGS=${SWEEP_ARGS:---budgets 3e12,5.2e12,9e12,1.56e13,2.7e13 --sizes-per-budget 6 --tokens-per-param 80
    --ladder 2x32,1x64,2x64,3x64,2x96,3x96,4x96,3x128,4x128,4x160,5x160,5x192,6x192,6x224,7x256,8x256,8x320}
# shellcheck disable=SC2086
timeout "${BUDGET_S:-540}" python3 -m experiments scaling --data runs/tokens/bytes-py --out runs/scaling \
    --time-budget-s "${SWEEP_S:-450}" --check $SWEEP_ARGS 2>&1 | tee "$OUT/scaling.log" | grep -v "^\s*$" | tail -40
tar czf "$OUT/scaling-runs.tgz" runs/scaling
cp runs/scaling/report.json "$OUT/" 2>/dev/null; cp runs/scaling/*.png "$OUT/" 2>/dev/null; ls "$OUT"
