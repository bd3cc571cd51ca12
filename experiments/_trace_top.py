"""(device diagnostic) The GPU kernels that take the most time in a jax.profiler trace folder.

    PYTHONPATH=. python3 experiments/_trace_top.py TRACE_DIR [STEPS] [TOP]

Prints the busy time per step, a breakdown by kind of kernel (matrix products, attention, the fused
loss, XLA's elementwise / reduction fusions, copies) and the top kernels by name.
"""
import collections
import glob
import gzip
import json
import sys

# (kind, substrings of the kernel name), first match wins; names are lowered first.
KINDS = (
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("loss (fused CE)", ("cross_entropy", "linear_ce", "_ce_")),
    ("norms (Pallas)", ("norm",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "cublas", "matmul", "dot")),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset", "dynamic_update_slice", "dynamic_slice")),
    ("reduction fusion", ("reduce", "input_")),
    ("elementwise fusion", ("loop_", "fusion", "convert", "add", "multiply", "select")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def main(folder: str, steps: int = 3, top: int = 25) -> None:
    path = sorted(glob.glob(f"{folder}/plugins/profile/*/*.trace.json.gz"))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals, counts, kinds = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and processes.get(e["pid"], "").startswith("/device:GPU:0"):
            totals[e["name"][:90]] += e["dur"]
            counts[e["name"][:90]] += 1
            kinds[kind_of(e["name"])] += e["dur"]
    whole = sum(totals.values())
    print(f"GPU 0 busy {whole / 1e3 / steps:.1f} ms per step over {steps} steps; by kind (ms per step, share):")
    for kind, micros in kinds.most_common():
        print(f"{micros / 1e3 / steps:8.2f} {micros / whole:6.1%}  {kind}")
    print("top kernels (ms per step, share, calls per step):")
    for name, micros in totals.most_common(top):
        print(f"{micros / 1e3 / steps:8.2f} {micros / whole:6.1%} x{counts[name] // steps:<4} {name}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
