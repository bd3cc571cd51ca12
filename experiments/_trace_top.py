"""(device diagnostic) The GPU kernels that take the most time in a jax.profiler trace folder.

    PYTHONPATH=. python3 experiments/_trace_top.py TRACE_DIR [STEPS] [TOP]
"""
import collections
import glob
import gzip
import json
import sys


def main(folder: str, steps: int = 3, top: int = 25) -> None:
    path = sorted(glob.glob(f"{folder}/plugins/profile/*/*.trace.json.gz"))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and processes.get(e["pid"], "").startswith("/device:GPU:0"):
            totals[e["name"][:90]] += e["dur"]
            counts[e["name"][:90]] += 1
    whole = sum(totals.values())
    print(f"GPU 0 busy {whole / 1e3 / steps:.1f} ms per step over {steps} steps; top kernels (ms per step, share):")
    for name, micros in totals.most_common(top):
        print(f"{micros / 1e3 / steps:8.2f} {micros / whole:6.1%} x{counts[name] // steps:<4} {name}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
