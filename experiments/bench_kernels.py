"""Benchmark the fused Pallas norms and cross-entropy against XLA: GB/s against device copy, time and memory.

Norms (RMSNorm, LayerNorm; bfloat16 activations, float32 parameters): forward and forward +
backward of `kernels.norms` against the same functions in plain jax.numpy (`llmjax.model.layers`),
as achieved bandwidth over the fewest bytes each pass must move (forward: read x, write y;
forward + backward: that plus read x and dy, write dx; parameters and their gradients counted
once), and as a fraction of the device copy bandwidth measured in the same run.

Cross-entropy of the LM head (loss = sum nll + 1e-4 sum log_z^2, gradients of hidden and
embedding): `kernels.cross_entropy.linear_cross_entropy` against full float32 logits in XLA
(optax) and the training loss's chunked XLA version (`llmjax.train.step.chunked_cross_entropy`):
time, useful TFLOP/s (2 N d V forward, 6 N d V forward + backward) and the compiled program's
temporary memory.

Times are medians over --repeats timed runs of --inner back-to-back calls each, after a warm-up,
on several sets of random inputs so caches do not flatter; a norm call is shorter than a dispatch,
so one program runs it on each of --input-sets sets and its time is divided by their number. On a machine without a
GPU the Pallas kernels cannot run (their interpret mode is for tests): only the XLA rows are
timed, at tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

DEFAULT_NORM_SIZES = "16384x768,16384x4096,8192x8192"
DEFAULT_CE_SIZES = "16384x768x50304:50257,16384x2048x128256:128256"
CPU_NORM_SIZES = "256x768"
CPU_CE_SIZES = "256x64x512:500"
# Norm sweep (kernels.norms tuning per pass): tiles of these many elements (whole rows: block_rows = tile / the
# padded width, at least one row) with every warp count that gives each thread this many elements.
NORM_SWEEP_TILES = {"forward": (4096, 8192, 16384, 32768), "backward": (2048, 4096, 8192, 16384)}
NORM_SWEEP_WARPS = (4, 8, 16)
NORM_SWEEP_ELEMENTS_PER_THREAD = {"forward": (8, 64), "backward": (8, 32)}
# The backward's defaults also with other grids (programs per multiprocessor; the default is 2) and stages.
NORM_SWEEP_BACKWARD_EXTRA = ({"programs_per_multiprocessor": 1}, {"programs_per_multiprocessor": 4},
                             {"num_stages": 1}, {"num_stages": 3})
SWEEP = [  # (block_tokens, block_vocab, block_d, num_warps, num_stages)
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 256, 32, 8, 4), (128, 128, 64, 8, 3),
]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_kernels",
        description="Time the fused Pallas RMSNorm / LayerNorm and linear cross-entropy kernels against their "
        "XLA versions on this machine's first device; print a table, write JSON and a bar chart. "
        "The kernels need a CUDA GPU; elsewhere only the XLA versions are timed, at tiny sizes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench/kernels.json"),
                   help="JSON results; the bar chart goes next to it with the suffix .png")
    p.add_argument("--norm-sizes", default=None,
                   help=f"comma-separated ROWSxD norm inputs (default on a GPU: {DEFAULT_NORM_SIZES}; "
                   f"elsewhere {CPU_NORM_SIZES})")
    p.add_argument("--ce-sizes", default=None,
                   help="comma-separated TOKENSxD_MODELxPADDED_VOCAB:VOCAB cross-entropy problems (default on a GPU: "
                   f"{DEFAULT_CE_SIZES}; elsewhere {CPU_CE_SIZES})")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="activation / embedding dtype (norm parameters stay float32)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per measurement; the median is reported")
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per timed run (hides launch gaps)")
    p.add_argument("--input-sets", type=int, default=8,
                   help="norms: random input sets, each normalized once per timed program (the cross-entropy "
                   "rotates between two)")
    p.add_argument("--sweep", action="store_true",
                   help="also time both norms at several tile / warp / grid configurations per pass (every norm "
                   "size) and the fused cross-entropy (first CE size) at several tile configurations")
    p.add_argument("--sweep-seconds", type=float, default=0,
                   help="norm sweep: start no new configuration after this many seconds (0: no limit)")
    p.add_argument("--skip-norms", action="store_true", help="do not benchmark the norms")
    p.add_argument("--skip-ce", action="store_true", help="do not benchmark the cross-entropy")
    p.add_argument("--no-plot", action="store_true", help="write no PNG chart")
    return p.parse_args(argv)


# --- measuring ---------------------------------------------------------------------------

def median_seconds(fn, input_sets, repeats: int, inner: int) -> float:
    """Median wall time of one call of jitted fn, after a warm-up call on every input set."""
    import jax

    for inputs in input_sets:
        jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(inner):
            out = fn(*input_sets[i % len(input_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def median_seconds_batched(fn, input_sets, repeats: int, inner: int) -> float:
    """Median device time of one call of fn, for calls far shorter than a dispatch: one jitted program
    applies fn to every input set in turn (distinct inputs, so nothing is merged or cached), and the
    time of that program is divided by the number of sets."""
    import jax

    every_set = jax.jit(lambda sets: [fn(*inputs) for inputs in sets])
    return median_seconds(every_set, [(input_sets,)], repeats, inner) / len(input_sets)


def compile_with_memory(fn, *args):
    """(fn compiled for these arguments' shapes, its temporary device memory in bytes or None)."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    return compiled, None if analysis is None else int(analysis.temp_size_in_bytes)


def copy_bandwidth(args) -> float:
    """GB/s of a 1 GiB elementwise copy (-x, bfloat16 or float32, the faster): bytes read plus bytes
    written, over the median time."""
    import jax
    import jax.numpy as jnp

    size = 2**30 if jax.devices()[0].platform == "gpu" else 2**23
    best = 0.0
    for dtype in (jnp.bfloat16, jnp.float32):
        elements = size // jnp.dtype(dtype).itemsize
        sets = [(jax.random.normal(jax.random.key(i), (elements,), dtype),) for i in range(2)]
        seconds = median_seconds(jax.jit(jnp.negative), sets, args.repeats, args.inner)
        best = max(best, 2 * size / seconds / 1e9)
    return best


# --- norms -------------------------------------------------------------------------------

def norm_functions(kind: str, use_kernel: bool, tuning: dict | None = None):
    """(forward(x, scale, bias), forward_backward(x, scale, bias, dy)), not jitted. tuning: kernels.norms'
    per-pass tuning, {"forward": {...}, "backward": {...}}."""
    import jax

    from llmjax.kernels import norms

    eps = 1e-5
    tuning = tuning or {}
    if kind == "rms":
        f = (lambda x, s, b: norms.rms_norm(x, s, eps, **tuning)) if use_kernel else (
            lambda x, s, b: norms.rms_norm_reference(x, s, eps))
    else:
        f = (lambda x, s, b: norms.layer_norm(x, s, b, eps, **tuning)) if use_kernel else (
            lambda x, s, b: norms.layer_norm_reference(x, s, b, eps))

    def forward_backward(x, scale, bias, dy):
        y, vjp = jax.vjp(f, x, scale, bias)
        return y, vjp(dy)

    return f, forward_backward


def norm_bytes(rows: int, d: int, itemsize: int, kind: str, backward: bool) -> int:
    """Fewest bytes a pass must move: activations read / written once, float32 parameters once."""
    params = d * 4 * (2 if kind == "layer" else 1)
    forward = 2 * rows * d * itemsize + params
    return forward + (3 * rows * d * itemsize + 2 * params if backward else 0)


def norm_inputs(rows: int, d: int, dtype, count: int) -> list[tuple]:
    """(x, scale, bias, dy) sets: x with a non-zero mean, float32 parameters near 1 and 0."""
    import jax
    import jax.numpy as jnp

    sets = []
    for i in range(count):
        keys = jax.random.split(jax.random.key(100 + i), 4)
        x = jax.random.normal(keys[0], (rows, d), dtype) * 2 + 0.5
        scale = 1 + 0.1 * jax.random.normal(keys[1], (d,), jnp.float32)
        bias = 0.1 * jax.random.normal(keys[2], (d,), jnp.float32)
        sets.append((x, scale, bias, jax.random.normal(keys[3], (rows, d), dtype)))
    return sets


def time_norm(kind, impl, sets, args, copy_gbps, tuning: dict | None = None,
              passes=("fwd", "fwd+bwd")) -> list[dict]:
    """Forward and / or forward + backward rows for one norm implementation on one size."""
    rows, d = sets[0][0].shape
    dtype = sets[0][0].dtype
    forward, forward_backward = norm_functions(kind, impl == "pallas", tuning)
    results = []
    for name, fn, inputs in (("fwd", forward, [s[:3] for s in sets]), ("fwd+bwd", forward_backward, sets)):
        if name not in passes:
            continue
        seconds = median_seconds_batched(fn, inputs, args.repeats, args.inner)
        moved = norm_bytes(rows, d, dtype.itemsize, kind, name == "fwd+bwd")
        results.append({
            "norm": kind, "impl": impl, "pass": name, "rows": rows, "d": d, "dtype": dtype.name,
            "tuning": tuning or {}, "ms": seconds * 1e3, "bytes": moved, "gbps": moved / seconds / 1e9,
            "fraction_of_copy": moved / seconds / 1e9 / copy_gbps,
        })
        print(f"  norm {kind:5} {impl:6} {name:7} {rows}x{d} {tuning or ''}: {seconds * 1e3:.3f} ms, "
              f"{results[-1]['gbps']:.0f} GB/s", flush=True)
    return results


def bench_norms(args, on_gpu: bool, copy_gbps: float) -> list[dict]:
    import jax.numpy as jnp

    results = []
    for size in (args.norm_sizes or (DEFAULT_NORM_SIZES if on_gpu else CPU_NORM_SIZES)).split(","):
        rows, d = (int(n) for n in size.split("x"))
        sets = norm_inputs(rows, d, jnp.dtype(args.dtype), args.input_sets)
        for kind in ("rms", "layer"):
            for impl in ("pallas", "xla") if on_gpu else ("xla",):
                results += time_norm(kind, impl, sets, args, copy_gbps)
    return results


def norm_sweep_tunings(which: str, d: int, multiprocessors: int) -> list[dict]:
    """One pass's tunings for rows of width d: every (block_rows, num_warps) of NORM_SWEEP_TILES x NORM_SWEEP_WARPS
    within NORM_SWEEP_ELEMENTS_PER_THREAD (whole rows only); the backward's also NORM_SWEEP_BACKWARD_EXTRA."""
    padded = 1 << (d - 1).bit_length()
    low, high = NORM_SWEEP_ELEMENTS_PER_THREAD[which]
    shapes = []
    for tile in NORM_SWEEP_TILES[which]:
        block_rows = max(1, tile // padded)
        for warps in NORM_SWEEP_WARPS:
            per_thread = block_rows * padded // (32 * warps)
            if low <= per_thread <= high and (block_rows, warps) not in shapes:
                shapes.append((block_rows, warps))
    tunings = [{"block_rows": r, "num_warps": w} for r, w in shapes]
    if which == "backward":
        for extra in NORM_SWEEP_BACKWARD_EXTRA:
            per_multiprocessor = extra.get("programs_per_multiprocessor")
            tunings.append({"programs": per_multiprocessor * multiprocessors} if per_multiprocessor else extra)
    return tunings


def sweep_norms(args, copy_gbps: float) -> list[dict]:
    """Both norms at every sweep tuning (norm_sweep_tunings), one pass at a time: forward tunings timed on the
    forward alone (LayerNorm with and without one_pass), backward tunings on forward + backward with the
    default forward. Stops starting new rows after --sweep-seconds."""
    import jax
    import jax.numpy as jnp

    cores = getattr(jax.devices()[0], "core_count", None) or 132
    started = time.perf_counter()
    results = []
    for size in (args.norm_sizes or DEFAULT_NORM_SIZES).split(","):
        rows, d = (int(n) for n in size.split("x"))
        sets = norm_inputs(rows, d, jnp.dtype(args.dtype), args.input_sets)
        plan = []
        for kind in ("rms", "layer"):
            for tuning in norm_sweep_tunings("forward", d, cores):
                plan.append((kind, {"forward": tuning}, ("fwd",)))
                if kind == "layer":
                    plan.append((kind, {"forward": {**tuning, "one_pass": True}}, ("fwd",)))
            for tuning in norm_sweep_tunings("backward", d, cores):
                plan.append((kind, {"backward": tuning}, ("fwd+bwd",)))
        for kind, tuning, passes in plan:
            if args.sweep_seconds and time.perf_counter() - started > args.sweep_seconds:
                results.append({"norm": kind, "size": size, "tuning": tuning, "error": "skipped: --sweep-seconds"})
                continue
            try:
                results += time_norm(kind, "pallas", sets, args, copy_gbps, tuning, passes)
            except Exception as error:  # noqa: BLE001 - a configuration Triton cannot compile
                results.append({"norm": kind, "size": size, "tuning": tuning,
                                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
    return results


def best_norm_tunings(sweep: list[dict]) -> list[dict]:
    """The fastest tuning of each (norm, pass, size) in a sweep."""
    best = {}
    for row in sweep:
        if "error" in row:
            continue
        key = (row["norm"], row["pass"], row["rows"], row["d"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    return list(best.values())


# --- cross-entropy -----------------------------------------------------------------------

def ce_loss(kind: str, vocab_size: int, **kernel_options):
    """loss(hidden, embedding, targets) = sum nll + 1e-4 sum log_z^2 with one implementation."""
    import jax.numpy as jnp

    from llmjax.kernels.cross_entropy import cross_entropy_reference, linear_cross_entropy
    from llmjax.config import TrainConfig
    from llmjax.train.step import chunked_cross_entropy

    def loss(hidden, embedding, targets):
        if kind == "pallas":
            nll, log_z = linear_cross_entropy(hidden, embedding, targets, vocab_size, **kernel_options)
        elif kind == "xla_full":
            nll, log_z = cross_entropy_reference(hidden, embedding, targets, vocab_size)
        else:
            nll, log_z = chunked_cross_entropy(hidden, embedding, targets, vocab_size, TrainConfig().loss_chunk_tokens)
        return nll.sum() + 1e-4 * jnp.square(log_z).sum(), nll

    return loss


def ce_inputs(tokens: int, d: int, padded_vocab: int, vocab_size: int, dtype, count: int) -> list[tuple]:
    import jax
    import jax.numpy as jnp

    sets = []
    for i in range(count):
        keys = jax.random.split(jax.random.key(200 + i), 3)
        hidden = jax.random.normal(keys[0], (tokens, d), dtype)
        embedding = (jax.random.normal(keys[1], (d, padded_vocab), jnp.float32) * d**-0.5).astype(dtype)
        sets.append((hidden, embedding, jax.random.randint(keys[2], (tokens,), 0, vocab_size)))
    return sets


def time_ce(loss, sets, args) -> dict:
    """Forward and forward + backward time and memory of one implementation; its nll on set 0."""
    import jax

    forward, forward_temp = compile_with_memory(lambda h, w, t: loss(h, w, t)[1], *sets[0])
    grad, grad_temp = compile_with_memory(jax.value_and_grad(lambda h, w, t: loss(h, w, t)[0], argnums=(0, 1)), *sets[0])
    return {
        "fwd_ms": median_seconds(forward, sets, args.repeats, args.inner) * 1e3,
        "fwd_bwd_ms": median_seconds(grad, sets, args.repeats, args.inner) * 1e3,
        "fwd_temp_bytes": forward_temp,
        "fwd_bwd_temp_bytes": grad_temp,
        "nll": forward(*sets[0]),
    }


def bench_cross_entropy(args, on_gpu: bool) -> list[dict]:
    import jax.numpy as jnp
    import numpy as np

    results = []
    for size in (args.ce_sizes or (DEFAULT_CE_SIZES if on_gpu else CPU_CE_SIZES)).split(","):
        shape, vocab_size = size.split(":")
        tokens, d, padded_vocab = (int(n) for n in shape.split("x"))
        sets = ce_inputs(tokens, d, padded_vocab, int(vocab_size), jnp.dtype(args.dtype), 2)
        flops = 2 * tokens * d * int(vocab_size)
        reference_nll = None
        for impl in ("pallas", "xla_full", "xla_chunked") if on_gpu else ("xla_full", "xla_chunked"):
            row = {"impl": impl, "tokens": tokens, "d": d, "padded_vocab": padded_vocab, "vocab_size": int(vocab_size),
                   "dtype": jnp.dtype(args.dtype).name}
            try:
                row.update(time_ce(ce_loss(impl, int(vocab_size)), sets, args))
            except Exception as error:  # noqa: BLE001 - e.g. out of memory for full logits at LLaMA size
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                print(f"  ce {impl} {size}: {row['error']}", flush=True)
                results.append(row)
                continue
            nll = np.asarray(row.pop("nll"), np.float64)
            reference_nll = nll if reference_nll is None else reference_nll
            row["max_abs_nll_difference_to_first"] = float(np.abs(nll - reference_nll).max())
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3 * flops / row["fwd_bwd_ms"] / 1e9
            results.append(row)
            print(f"  ce {impl:11} {size}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms, "
                  f"temp {_gib(row['fwd_bwd_temp_bytes'])}", flush=True)
    return results


def sweep_cross_entropy(args) -> list[dict]:
    """The fused cross-entropy at several tile configurations, on the first CE size."""
    import jax.numpy as jnp

    shape, vocab_size = (args.ce_sizes or DEFAULT_CE_SIZES).split(",")[0].split(":")
    tokens, d, padded_vocab = (int(n) for n in shape.split("x"))
    sets = ce_inputs(tokens, d, padded_vocab, int(vocab_size), jnp.dtype(args.dtype), 2)
    results = []
    for block_tokens, block_vocab, block_d, num_warps, num_stages in SWEEP:
        options = dict(block_tokens=block_tokens, block_vocab=block_vocab, block_d=block_d,
                       num_warps=num_warps, num_stages=num_stages)
        row = {"tokens": tokens, "d": d, "padded_vocab": padded_vocab, **options}
        try:
            row.update(time_ce(ce_loss("pallas", int(vocab_size), **options), sets, args))
            row.pop("nll")
        except Exception as error:  # noqa: BLE001 - a configuration Triton cannot compile (e.g. shared memory)
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        results.append(row)
        print(f"  sweep {options}: " + (row.get("error") or f"fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms"),
              flush=True)
    return results


# --- reporting ---------------------------------------------------------------------------

def _gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_tables(report: dict) -> None:
    print(f"\ndevice: {report['device']}; copy bandwidth {report['copy_gbps']:.0f} GB/s")
    if report["norms"]:
        print("\n| norm | impl | pass | rows x d | ms | GB/s | of copy |\n| --- | --- | --- | --- | --- | --- | --- |")
        for r in report["norms"]:
            print(f"| {r['norm']} | {r['impl']} | {r['pass']} | {r['rows']}x{r['d']} | {r['ms']:.3f} | {r['gbps']:.0f} "
                  f"| {r['fraction_of_copy']:.0%} |")
    if report["cross_entropy"]:
        print("\n| CE impl | N x d x V | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | fwd temp | fwd+bwd temp | max nll diff |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in report["cross_entropy"]:
            size = f"{r['tokens']}x{r['d']}x{r['padded_vocab']}"
            if "error" in r:
                print(f"| {r['impl']} | {size} | {r['error'][:60]} | | | | | |")
                continue
            print(f"| {r['impl']} | {size} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | "
                  f"{_gib(r['fwd_temp_bytes'])} | {_gib(r['fwd_bwd_temp_bytes'])} | {r['max_abs_nll_difference_to_first']:.1e} |")
    if report.get("norm_sweep"):
        errors = [r for r in report["norm_sweep"] if "error" in r]
        print(f"\nnorm sweep: {len(report['norm_sweep']) - len(errors)} rows, {len(errors)} failed or skipped")
        for r in errors[:10]:
            print(f"  {r['norm']} {r['size']} {r['tuning']}: {r['error'][:100]}")
        print("\n| best of sweep: norm | pass | rows x d | tuning | ms | GB/s | of copy |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        for r in best_norm_tunings(report["norm_sweep"]):
            print(f"| {r['norm']} | {r['pass']} | {r['rows']}x{r['d']} | {r['tuning']} | {r['ms']:.3f} | "
                  f"{r['gbps']:.0f} | {r['fraction_of_copy']:.0%} |")
    if report.get("sweep"):
        print("\n| bt | bv | bd | warps | stages | fwd ms | fwd+bwd ms |\n| --- | --- | --- | --- | --- | --- | --- |")
        for r in report["sweep"]:
            times = f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f}" if "error" not in r else f"{r['error'][:50]} |"
            print(f"| {r['block_tokens']} | {r['block_vocab']} | {r['block_d']} | {r['num_warps']} | {r['num_stages']} "
                  f"| {times} |")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (norm_ax, ce_ax) = plt.subplots(1, 2, figsize=(15, 5))
    labels = [f"{r['norm']} {r['pass']}\n{r['rows']}x{r['d']}" for r in report["norms"] if r["impl"] == "xla"]
    for offset, impl in ((-0.2, "pallas"), (0.2, "xla")):
        values = [r["gbps"] for r in report["norms"] if r["impl"] == impl]
        if values:
            norm_ax.bar([i + offset for i in range(len(values))], values, width=0.4, label=impl)
    norm_ax.axhline(report["copy_gbps"], color="black", linestyle="--", label="device copy")
    norm_ax.set_xticks(range(len(labels)), labels, fontsize=7)
    norm_ax.set_ylabel("GB/s")
    norm_ax.set_title("norms: achieved bandwidth")
    norm_ax.legend()
    rows = [r for r in report["cross_entropy"] if "error" not in r]
    names = [f"{r['impl']}\n{r['d']}x{r['padded_vocab']}" for r in rows]
    ce_ax.bar(range(len(rows)), [r["fwd_bwd_ms"] for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        ce_ax.annotate(_gib(r["fwd_bwd_temp_bytes"]), (i, r["fwd_bwd_ms"]), ha="center", va="bottom", fontsize=7)
    ce_ax.set_xticks(range(len(rows)), names, fontsize=7)
    ce_ax.set_ylabel("forward + backward ms (label: temporary memory)")
    ce_ax.set_title(f"cross-entropy, {rows[0]['tokens'] if rows else ''} tokens")
    fig.suptitle(f"{report['device']}: fused Pallas kernels vs XLA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import warnings

    import jax

    warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    if not on_gpu:
        print(f"no GPU here ({device.platform}): the Pallas kernels need a CUDA GPU; timing the XLA versions only, "
              "at tiny sizes", flush=True)
    report = {"device": getattr(device, "device_kind", device.platform), "platform": device.platform,
              "jax": jax.__version__, "python": platform.python_version(),
              "command": "python -m experiments bench_kernels " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: args.out.write_text(json.dumps(report, indent=1))  # noqa: E731 - after each part
    report["copy_gbps"] = copy_bandwidth(args)
    print(f"copy bandwidth: {report['copy_gbps']:.0f} GB/s", flush=True)
    report["norms"] = [] if args.skip_norms else bench_norms(args, on_gpu, report["copy_gbps"])
    save()
    report["cross_entropy"] = [] if args.skip_ce else bench_cross_entropy(args, on_gpu)
    save()
    report["norm_sweep"] = sweep_norms(args, report["copy_gbps"]) if args.sweep and on_gpu and not args.skip_norms else []
    save()
    report["sweep"] = sweep_cross_entropy(args) if args.sweep and on_gpu and not args.skip_ce else []
    save()
    if not args.no_plot:
        plot(report, args.out.with_suffix(".png"))
    print_tables(report)
    print(f"\nwrote {args.out}" + ("" if args.no_plot else f" and {args.out.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
