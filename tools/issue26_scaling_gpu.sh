#!/usr/bin/env bash
# Issue 26 part 2 (IsoFLOP sweep, fits, the 10x check) on one GPU, run from the repository root on the device, as
# docs/scaling.md says: byte-level shards of the device's Python sources, then `experiments scaling --check` under a
# time budget. The run cache comes back as scaling-runs.tgz; if the log ends with "left to do", unpack it here
# (`tar xzf FILES_AT/scaling-runs.tgz`: it restores runs/scaling) and call again with carry ["runs/scaling"].
#   bash tools/issue26_scaling_gpu.sh              (no carry needed: the scaling code imports nothing optional)
set -uo pipefail
export PYTHONUNBUFFERED=1; mkdir -p "${OUT:=runs}"
STD=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m experiments tokenize --tokenizer bytes --no-progress --out runs/tokens/bytes-py --corpus "$STD/**/*.py" \
    "$SITE/numpy/**/*.py" "$SITE/scipy/**/*.py" "$SITE/jax/**/*.py" "$SITE/sklearn/**/*.py" 2>&1 | tail -3
timeout "${BUDGET_S:-540}" python3 -m experiments scaling --data runs/tokens/bytes-py --out runs/scaling \
    --time-budget-s "${SWEEP_S:-450}" --check 2>&1 | tee "$OUT/scaling.log" | grep -v "^\s*$" | tail -40
tar czf "$OUT/scaling-runs.tgz" runs/scaling
cp runs/scaling/report.json "$OUT/" 2>/dev/null; cp runs/scaling/*.png "$OUT/" 2>/dev/null; ls "$OUT"
