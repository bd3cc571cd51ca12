#!/usr/bin/env bash
# (device diagnostic) Training-step variants side by side, one process each, results under $OUT.
#   bash tools/speed_sweep.sh NAME "XLA_FLAGS" bench_train-args... ; repeat per variant
# Everything goes to $OUT/sweep.log (the device returns 8 files at most); --profile adds a kernel breakdown.
set -u
name=$1; flags=$2; shift 2
XLA_FLAGS="$flags" timeout 300 python3 -m experiments bench_train --out /tmp/bench_$name "$@" >/tmp/$name.log 2>&1
rc=$?
{ echo "== $name (rc $rc) XLA_FLAGS='$flags' $*"; grep -E "llmjax|peer|ours /|loss of|Error|error" /tmp/$name.log | head -8
  [ $rc = 0 ] || tail -20 /tmp/$name.log; } | tee -a "$OUT/sweep.log"
for arg in "$@"; do
  if [ "${prev:-}" = "--profile" ]; then
    # with XLA_FLAGS=--xla_dump_to=/tmp/dump_NAME --xla_dump_hlo_as_text, name each fusion's source line
    hlo=$(ls -S /tmp/dump_$name/*train_step*after_optimizations.txt 2>/dev/null | head -1)
    python3 tools/trace_top.py "$arg" 3 40 $hlo | tee -a "$OUT/sweep.log"
  fi
  prev=$arg
done
