#!/usr/bin/env bash
# (device diagnostic) Training-step variants side by side, one process each, results under $OUT.
#   bash experiments/_speed_sweep.sh NAME "XLA_FLAGS" bench_train-args... ; repeat per variant
# Each variant writes $OUT/NAME.log and $OUT/NAME.json; a variant with --profile gets a kernel breakdown.
set -u
name=$1; flags=$2; shift 2
XLA_FLAGS="$flags" timeout 300 python3 -m experiments bench_train --out /tmp/bench_$name "$@" >"$OUT/$name.log" 2>&1
echo "== $name (rc $?) XLA_FLAGS='$flags' $*"; grep -E "llmjax|peer|ours /|loss of|Error|error" "$OUT/$name.log" | head -8
cp /tmp/bench_$name/results.json "$OUT/$name.json" 2>/dev/null
for arg in "$@"; do
  if [ "${prev:-}" = "--profile" ]; then python3 experiments/_trace_top.py "$arg" 3 30 | tee "$OUT/$name.top"; fi
  prev=$arg
done
