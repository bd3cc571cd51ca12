"""(device diagnostic) The GPU kernels that take the most time in a jax.profiler trace folder.

    PYTHONPATH=. python3 tools/trace_top.py TRACE_DIR [STEPS] [TOP] [HLO_AFTER_OPTIMIZATIONS.txt]

Prints the busy time per step, a breakdown by kind of kernel (matrix products, attention, the fused
loss, XLA's elementwise / reduction fusions, copies) and the top kernels by name; given the step's
optimized HLO (XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text), each XLA fusion also gets the
JAX operation it came from and its output shapes, and the busy time is also broken down by the model's
named scopes (jax.named_scope: "attention/qkv", "attention/core", "mlp", "layer 3/attention/rope", ...) and by
direction (forward, backward, recomputed by remat).
"""
import collections
import glob
import gzip
import json
import re
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


def _frames(lines: list[str]) -> dict:
    """{stack_frame_id: "file:line function"} of the innermost llmjax / kernels frame, from the dump's tables."""
    tables, section = {}, None
    for line in lines:
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = tables.setdefault(line.strip(), {})
        elif section is not None and re.match(r"^\d+ ", line):
            key, value = line.split(" ", 1)
            section[int(key)] = value.strip()
        elif line.startswith(("HloModule", "ENTRY", "%")) and tables:
            break

    def field(text, name):
        return int(re.search(name + r"=(\d+)", text).group(1))

    def describe(frame_id, depth=0):
        frame = tables["StackFrames"][frame_id]
        location = tables["FileLocations"][field(frame, "file_location_id")]
        file = tables["FileNames"][field(location, "file_name_id")].strip('"')
        where = f"{file.split('/')[-1]}:{field(location, 'line')} {tables['FunctionNames'][field(location, 'function_name_id')].strip(chr(34))}"
        parent = field(frame, "parent_frame_id")
        if ("/llmjax/" in file or "/kernels/" in file) or parent == frame_id or depth > 50:
            return where
        return describe(parent, depth + 1)

    try:
        return {frame_id: describe(frame_id) for frame_id in tables.get("StackFrames", {})}
    except (KeyError, AttributeError):
        return {}


def fusion_sources(hlo_path: str) -> dict:
    """{kernel name as profiled: "source line, op -> output shape"} for the instructions of an optimized HLO dump."""
    lines = open(hlo_path).read().splitlines()
    frames = _frames(lines)
    pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) (?:fusion|custom-call|copy|transpose)\(.*?op_name=\"([^\"]+)\"")
    sources = {}
    for line in lines:
        match = pattern.match(line)
        if match:
            name, shape, op = match.groups()
            frame = re.search(r"stack_frame_id=(\d+)", line)
            where = frames.get(int(frame.group(1)), "") if frame else ""
            sources[name.replace(".", "_")] = f"{where}  {op.split('/')[-1]} -> {shape[:70]}"
    return sources

TRANSFORM_SEGMENTS = ("while", "body", "eval_jaxpr", "checkpoint", "rematted_computation", "cond", "branch")


def scope_of(op_name: str) -> tuple[str, str]:
    """(direction, named scope) of an HLO instruction's op_name metadata, e.g.
    "jit(train_step)/transpose(jvp())/while/body/eval_jaxpr/attention/core/bskgd,btkd->bkgst/dot_general"
    -> ("backward", "attention/core"). Transformations, jit(...) wrappers, einsum specs and the primitive are dropped."""
    direction = ("backward" if "transpose(" in op_name else
                 "recomputed" if "rematted_computation" in op_name else "forward")
    segments = op_name.split(";")[0].split("/")[:-1]
    kept = [s for s in segments if "(" not in s and "->" not in s and "," not in s and s not in TRANSFORM_SEGMENTS]
    return direction, "/".join(kept) or "(outside the named scopes)"


def instruction_op_names(hlo_path: str) -> dict:
    """{instruction name (dots as underscores, as kernels and trace events name them): op_name}."""
    pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"")
    names = {}
    for line in open(hlo_path):
        match = pattern.match(line)
        if match:
            names[match.group(1).replace(".", "_")] = match.group(2)
    return names


def event_op_name(event: dict, op_names: dict) -> str | None:
    """The op_name behind one GPU kernel event: its tf_op / hlo_op argument, else its own name as an HLO
    instruction (XLA's fusions are launched under their instruction's name)."""
    args = event.get("args", {})
    if "tf_op" in args and "/" in str(args["tf_op"]):
        return str(args["tf_op"])
    for key in ("hlo_op", "long_name", "name"):
        if key in args:
            found = op_names.get(str(args[key]).split(" ")[0].lstrip("%").replace(".", "_"))
            if found:
                return found
    return op_names.get(event["name"].replace(".", "_"))


def print_scopes(gpu_events: list, op_names: dict, steps: int, whole: float) -> None:
    by_scope, unmatched = collections.Counter(), 0.0
    for e in gpu_events:
        op_name = event_op_name(e, op_names)
        if op_name is None:
            unmatched += e["dur"]
            continue
        direction, scope = scope_of(op_name)
        by_scope[(scope, direction)] += e["dur"]
    print("by named scope and direction (ms per step, share):")
    for (scope, direction), micros in sorted(by_scope.items(), key=lambda item: -item[1]):
        print(f"{micros / 1e3 / steps:8.2f} {micros / whole:6.1%}  {scope:40} {direction}")
    print(f"{unmatched / 1e3 / steps:8.2f} {unmatched / whole:6.1%}  (kernels not matched to an HLO instruction)")
    keys = sorted({k for e in gpu_events[:200] for k in e.get("args", {})})
    print(f"(trace event arguments seen: {', '.join(keys) or 'none'})")


def main(folder: str, steps: int = 3, top: int = 25, hlo: str | None = None) -> None:
    sources = fusion_sources(hlo) if hlo else {}
    path = sorted(glob.glob(f"{folder}/plugins/profile/*/*.trace.json.gz"))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals, counts, kinds = collections.Counter(), collections.Counter(), collections.Counter()
    gpu_events = [e for e in events if e.get("ph") == "X" and processes.get(e["pid"], "").startswith("/device:GPU:0")]
    for e in gpu_events:
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
        if name in sources:
            print(f"{'':24}{sources[name][:160]}")
    if hlo:
        print_scopes(gpu_events, instruction_op_names(hlo), steps, whole)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]), *sys.argv[4:5])
