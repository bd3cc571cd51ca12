#!/usr/bin/env bash
# Issue 26 part 2 (IsoFLOP sweep, fits, the 10x check) on one GPU, run from the repository root on the device, as
# docs/scaling.md says: byte-level shards of the device's Python sources, then `experiments scaling --check` under a
# time budget. The run cache comes back as scaling-runs.tgz; if the log ends with "left to do", unpack it here
# (`tar xzf FILES_AT/scaling-runs.tgz`: it restores runs/scaling) and call again with carry ["runs/scaling"].
#   bash tools/issue26_scaling_gpu.sh              (no carry needed: the scaling code imports nothing optional)
# SWEEP_ARGS adds flags to the sweep (its defaults are docs/scaling.md's H100 plan).
set -uo pipefail
export PYTHONUNBUFFERED=1; mkdir -p "${OUT:=runs}"
STD=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvidia-smi --query-gpu=name --format=csv,noheader
CORPUS=("$STD/**/*.py")  # patterns, expanded by the tokenizer (recursive **), not by the shell
for p in numpy scipy jax sklearn torch transformers; do [ -d "$SITE/$p" ] && CORPUS+=("$SITE/$p/**/*.py"); done
SECONDS=0; python3 -m experiments tokenize --tokenizer bytes --no-progress --out runs/tokens/bytes-py \
    --corpus "${CORPUS[@]}" 2>&1 | tail -3; echo "tokenized in $SECONDS s"
SWEEP_ARGS=${SWEEP_ARGS:-}
# shellcheck disable=SC2086
timeout "${BUDGET_S:-540}" python3 -m experiments scaling --data runs/tokens/bytes-py --out runs/scaling \
    --time-budget-s "${SWEEP_S:-450}" --check $SWEEP_ARGS 2>&1 | tee "$OUT/scaling.log" | tr "\r" "\n" | grep -Ev "^\s*$|run/s]|fit/s]" | tail -40
tar czf "$OUT/scaling-runs.tgz" runs/scaling
cp runs/scaling/report.json "$OUT/" 2>/dev/null; cp runs/scaling/*.png "$OUT/" 2>/dev/null; ls "$OUT"
