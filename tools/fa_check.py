"""GPU check of our Triton flash attention in one call: a config sweep of the three kernels at the headline
shape (every config's output / gradients checked against the float32 reference), a timing table of forward
and forward+backward TFLOP/s against cuDNN and jax's bundled Pallas kernel, one autotuner run, and the
GPU-marked tests.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m tools.fa_check --out $OUT

FLOPs: 4*b*h*s^2*d forward (halved for causal), 3.5x that for forward+backward (../shared/GPU.md).
Times: median over 3 rounds of back-to-back calls (async dispatch; one block at the end of each round).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("LLMJAX_FLASH_AUTOTUNE", "0")  # the sweep below does the tuning explicitly

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llmjax.kernels.flash_attention import autotune, attention_reference  # noqa: E402
from llmjax.kernels.flash_attention import triton as fa  # noqa: E402

START = time.time()
BUDGET_S = 540
INTERPRET = False  # --smoke: tiny shapes in interpret mode on a CPU, to check this script itself


def left() -> float:
    return BUDGET_S - (time.time() - START)


def log(*parts):
    print(f"[{time.time() - START:6.1f}s]", *parts, flush=True)


def seconds(fn, *args, iters=20, rounds=3) -> tuple[float, float]:
    """(median, spread) seconds per call."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            result = fn(*args)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / iters)
    return float(np.median(samples)), float(max(samples) - min(samples))


def short(error) -> str:
    """The informative lines of an error (compile errors carry kilobytes of IR)."""
    text = str(error)
    lines = [line.strip()[:240] for line in text.splitlines() if "\\x" not in line and (
        re.search(r"error|shared|resource|exceed|limit|memory", line, re.I))]
    return " | ".join(lines[:4]) or text[:300]


def flops(b, h, s, d, causal) -> float:
    return 4 * b * h * s * s * d / (2 if causal else 1)


def rel(got, want) -> float:
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def inputs(b, s, h, kvh, d, dtype=jnp.bfloat16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), dtype)
    k = jax.random.normal(keys[1], (b, s, kvh, d), dtype)
    v = jax.random.normal(keys[2], (b, s, kvh, d), dtype)
    do = jax.random.normal(keys[3], (b, s, h, d), dtype)
    return q, k, v, do


def poison(shape, dtype):
    """Fill and free a NaN buffer of this size, so a kernel that skips a tile shows NaN, not stale data."""
    jax.block_until_ready(jnp.full(shape, jnp.nan, dtype)).delete()


def reference_values(q, k, v, do, causal):
    up = [x.astype(jnp.float32) for x in (q, k, v, do)]

    @jax.jit
    def run(q, k, v, do):
        out, vjp = jax.vjp(functools.partial(attention_reference, causal=causal), q, k, v)
        return out, vjp(do)

    with jax.default_matmul_precision("highest"):
        return jax.block_until_ready(run(*up))


def sweep(results, b, s, h, kvh, d, causal):
    """Time every candidate of each kernel; check each against the float32 reference."""
    tag = f"b{b} s{s} h{h} kv{kvh} d{d} {'causal' if causal else 'full'}"
    q, k, v, do = inputs(b, s, h, kvh, d)
    want_out, want_grads = reference_values(q, k, v, do, causal)
    masking = dict(causal=causal, sliding_window=None, logit_softcap=None)
    fwd_flops = flops(b, h, s, d, causal)
    best = {}
    rows = []
    for which in ("forward", "dkv", "dq"):
        timings = {}
        if which != "forward":
            forward_sizes = fa.BlockSizes(best["forward"])
            out, lse = jax.jit(functools.partial(fa.flash_attention_forward_triton, block_sizes=forward_sizes,
                                                 interpret=INTERPRET, **masking))(q, k, v)
        configs = list(autotune.candidates(which, d, jnp.bfloat16))
        for config in configs:
            if left() < 60:
                log("sweep: out of time budget"); break
            try:
                if which == "forward":
                    fn = jax.jit(functools.partial(fa.flash_attention_forward_triton, block_sizes=fa.BlockSizes(config),
                                                   interpret=INTERPRET, **masking))
                    poison(q.shape, q.dtype)
                    got_out, _ = fn(q, k, v)
                    errors = {"out": rel(got_out, want_out)}
                    secs, spread = seconds(fn, q, k, v)
                    tflops = fwd_flops / secs / 1e12
                else:
                    other = "dq" if which == "dkv" else "dkv"
                    other_config = best.get(other, autotune.candidates(other, d, jnp.bfloat16)[0])
                    sizes = fa.BlockSizes(best["forward"], **{which: config, other: other_config})
                    fn = jax.jit(functools.partial(fa.flash_attention_backward_triton, block_sizes=sizes,
                                                   interpret=INTERPRET, **masking))
                    poison(q.shape, q.dtype)
                    dq, dk, dv = fn(q, k, v, out, lse, do)
                    errors = {"dq": rel(dq, want_grads[0]), "dk": rel(dk, want_grads[1]), "dv": rel(dv, want_grads[2])}
                    secs, spread = seconds(fn, q, k, v, out, lse, do)
                    tflops = 2.5 * fwd_flops / secs / 1e12  # the whole backward, at the backward's FLOPs
                ok = all(np.isfinite(e) and e < 2e-2 for e in errors.values())
                timings[config] = secs if ok else float("inf")
                row = dict(shape=tag, kernel=which, config=list(config.__dict__.values()), ms=secs * 1e3,
                           spread_ms=spread * 1e3, tflops=tflops, errors=errors, ok=ok)
                rows.append(row)
                log(f"{which:7s} {config} {secs * 1e3:7.3f} ms (+-{spread * 1e3:.3f}) {tflops:6.1f} TFLOP/s",
                    " ".join(f"{k}={e:.1e}" for k, e in errors.items()), "" if ok else "WRONG")
            except Exception as error:  # a config that does not compile: recorded, skipped
                rows.append(dict(shape=tag, kernel=which, config=list(config.__dict__.values()),
                                 error=f"{type(error).__name__}: {str(error)[:300]}"))
                log(f"{which:7s} {config} FAILED {type(error).__name__}: {short(error)}")
        if not timings:
            raise RuntimeError(f"no {which} config ran")
        best[which] = min(timings, key=timings.get)
    results["sweep"] += rows
    results["best"][tag] = {key: list(value.__dict__.values()) for key, value in best.items()}
    log("best", tag, best)
    return best


def table(results, b, s, h, kvh, d, causal, best):
    """Forward and forward+backward TFLOP/s: ours (best configs and defaults), cuDNN, bundled Pallas."""
    tag = f"b{b} s{s} h{h} kv{kvh} d{d} {'causal' if causal else 'full'}"
    q, k, v, do = inputs(b, s, h, kvh, d, seed=1)
    fwd_flops = flops(b, h, s, d, causal)
    impls = {}
    if best and len(best) == 3:
        impls["ours (swept)"] = functools.partial(fa.flash_attention_triton, causal=causal, interpret=INTERPRET,
                                                  block_sizes=fa.BlockSizes(best["forward"], best["dkv"], best["dq"]))
    impls["ours (defaults)"] = functools.partial(fa.flash_attention_triton, causal=causal, interpret=INTERPRET)
    impls["cudnn"] = functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn")
    if kvh == h:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as bundled
        impls["bundled pallas"] = functools.partial(bundled.mha, segment_ids=None, sm_scale=d**-0.5, causal=causal)
    reference_out = None
    for name, attention in impls.items():
        if left() < 30:
            log("table: out of time budget"); break
        try:
            forward = jax.jit(attention)
            both = jax.jit(lambda q, k, v, do, attention=attention: jax.vjp(attention, q, k, v)[1](do))
            out = forward(q, k, v)
            if reference_out is None:
                reference_out = reference_values(q, k, v, do, causal)[0]
            error = rel(out, reference_out)
            fwd_s, fwd_spread = seconds(forward, q, k, v)
            both_s, both_spread = seconds(both, q, k, v, do)
            row = dict(shape=tag, impl=name, fwd_ms=fwd_s * 1e3, fwd_tflops=fwd_flops / fwd_s / 1e12,
                       fwd_bwd_ms=both_s * 1e3, fwd_bwd_tflops=3.5 * fwd_flops / both_s / 1e12,
                       spread_ms=[fwd_spread * 1e3, both_spread * 1e3], out_error=error)
            results["table"].append(row)
            log(f"{tag} {name:16s} fwd {row['fwd_tflops']:6.1f} fwd+bwd {row['fwd_bwd_tflops']:6.1f} TFLOP/s "
                f"err {error:.1e}")
        except Exception as error:
            results["table"].append(dict(shape=tag, impl=name, error=f"{type(error).__name__}: {str(error)[:300]}"))
            log(f"{tag} {name} FAILED {type(error).__name__}: {str(error)[:500]}")


def tune_once(results, out_dir: Path):
    """The autotuner through the public API on a mid-size shape: time spent, configs chosen, JSON written."""
    os.environ["LLMJAX_FLASH_AUTOTUNE"] = "1"
    os.environ["LLMJAX_CACHE_DIR"] = str(out_dir / "cache")
    from llmjax.kernels.flash_attention import flash_attention

    q, k, v, do = inputs(2, 2048, 8, 2, 128, seed=2)
    fn = jax.jit(lambda q, k, v, do: jax.vjp(functools.partial(flash_attention, implementation="triton"), q, k, v)[1](do))
    start = time.time()
    jax.block_until_ready(fn(q, k, v, do))
    tuned = time.time() - start
    start = time.time()
    again = jax.jit(lambda q, k, v, do: jax.vjp(functools.partial(flash_attention, implementation="triton"),
                                                q, k, v)[1](do))  # a new trace: configs from the tuner's memory
    jax.block_until_ready(again(q, k, v, do))
    cached = time.time() - start
    path = out_dir / "cache" / autotune.CACHE_FILE
    results["autotune"] = dict(seconds_first=tuned, seconds_again=cached,
                               entries=json.loads(path.read_text())["entries"] if path.exists() else None)
    log(f"autotune: first call {tuned:.1f}s (tuning + compile), again {cached:.1f}s;", results["autotune"]["entries"])
    os.environ["LLMJAX_FLASH_AUTOTUNE"] = "0"


def run_gpu_tests(results):
    """The GPU-marked tests (real sizes against the reference), in a subprocess."""
    command = [sys.executable, "-W", "ignore", "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "tests/kernels/test_flash_attention.py"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=max(30, left() - 100))
    results["pytest"] = proc.stdout[-3000:]
    lines = [line[:300] for line in proc.stdout.splitlines() if "\\x" not in line]
    errors = [line for line in lines if re.search(r"error|exceed|shared|resource|passed|failed", line, re.I)]
    log("pytest -m gpu:\n" + "\n".join(errors[-40:]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/fa_check")))
    parser.add_argument("--skip", nargs="*", default=[], help="sections to skip: sweep64 full gqa tune pytest")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU check of the script)")
    args = parser.parse_args()
    global INTERPRET
    INTERPRET = args.smoke
    big = (4, 4096, 16) if not args.smoke else (1, 128, 2)
    b, s, h = big
    args.out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    log("device", device.device_kind, getattr(device, "compute_capability", "?"), "jax", jax.__version__)
    results = {"device": device.device_kind, "sweep": [], "best": {}, "table": []}

    def section(name, fn, *a):
        if name in args.skip or left() < 40:
            log(f"skip {name}"); return None
        try:
            return fn(*a)
        except Exception:
            log(f"{name} FAILED"); traceback.print_exc()
        finally:
            (args.out / "fa_check.json").write_text(json.dumps(results, indent=1, default=str))

    best = section("sweep", sweep, results, b, s, h, h, 128, True)
    section("table", table, results, b, s, h, h, 128, True, best)
    section("pytest", run_gpu_tests, results)
    section("gqa", table, results, b, s, h, max(1, h // 4), 128, True, best)
    section("tune", tune_once, results, args.out)
    section("full", table, results, b, s, h, h, 128, False, best)
    best64 = section("sweep64", sweep, results, b, s, 2 * h, 2 * h, 64, True)
    section("table64", table, results, b, s, 2 * h, 2 * h, 64, True, best64)
    section("sweep256", sweep, results, max(1, b // 2), s, max(1, h // 2), max(1, h // 2), 256, True)
    (args.out / "fa_check.json").write_text(json.dumps(results, indent=1, default=str))

    print("\n| shape | implementation | forward TFLOP/s | forward+backward TFLOP/s | out rel. error |")
    print("| --- | --- | --- | --- | --- |")
    for row in results["table"]:
        if "error" in row:
            print(f"| {row['shape']} | {row['impl']} | failed | | |")
        else:
            print(f"| {row['shape']} | {row['impl']} | {row['fwd_tflops']:.0f} | {row['fwd_bwd_tflops']:.0f} | "
                  f"{row['out_error']:.1e} |")
    print("best configs:", json.dumps(results["best"]))


if __name__ == "__main__":
    main()
