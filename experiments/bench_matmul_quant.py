"""Fused dequantize-matmul (Pallas) vs XLA's dequantize-then-dot vs the bf16 matmul, decode and prefill shapes (GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

# K x N of the linears of llama-1b (q / o 2048x2048, gate / up 2048x8192, down 8192x2048) and of a 7B LLaMA
# (4096x4096, gate / up 4096x11008, down 11008x4096)
SHAPES = ("2048x2048", "2048x8192", "8192x2048", "4096x4096", "4096x11008", "11008x4096")
# tile variants tried with --sweep at decode shapes, per format: MatmulTiles fields over SWEEP_BASE, and per_sm, the
# programs per multiprocessor that set the splits (0: no split). The GEMV (block_m 1) runs at batch 1 only. The
# defaults (default_tiles) are timed anyway.
SWEEP_BASE = dict(block_m=16, block_n=128, block_k=128, per_sm=4, num_warps=4, num_stages=1, swap_ab=True)
GEMV = dict(block_m=1, block_k=64, num_warps=2, swap_ab=False)
SWEEP = {
    "int4": (dict(block_k=64), dict(per_sm=2), dict(per_sm=8), dict(block_n=256, num_warps=8), GEMV),
    "int8": (dict(block_k=64), dict(block_k=128)),
    "nf4": (dict(block_k=64, nf4_lookup="permute"), dict(block_k=64, nf4_lookup="gather")),
}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_matmul_quant",
        description="Time x [rows, K] @ W [K, N] for W in bf16 (XLA's dot: cuBLAS), and quantized to int8 / int4 / "
        "nf4 through the fused Pallas kernel (kernels/matmul_quant.py), and int4 through XLA (dequantize, then "
        "dot). Batch-1 decode is bound by the bytes of W, which int4 cuts to about a quarter. Each timed call "
        "runs the product over enough distinct weight copies (--cold-mib) that they do not fit in L2, as in a "
        "model's decode step; the figure is per product. The device copy bandwidth (x + 1 over 2 GiB) is measured "
        "in the same run. On CPUs only the XLA paths run (the kernel would run in the Pallas interpreter).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rows", default="1,8,512", help="rows of x (1 / 8: decode; 512: prefill), comma-separated")
    p.add_argument("--formats", default="int8,int4,nf4", help="quantization formats, comma-separated")
    p.add_argument("--group", type=int, default=128, help="group size of int4 (int8 is per-channel, nf4 uses 64)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="KxN weight shapes, comma-separated")
    p.add_argument("--reps", type=int, default=7, help="timed calls per measurement (median)")
    p.add_argument("--min-products", type=int, default=256,
                   help="products per timed call at decode shapes (passes over the weight copies), so that the GPU "
                        "work outweighs the host's dispatch of a call with many arguments")
    p.add_argument("--cold-mib", type=float, default=160.0,
                   help="distinct quantized weight copies per timed call, at least this many MiB of them (2..64)")
    p.add_argument("--sweep", action="store_true",
                   help="also try the tile variants of SWEEP at decode shapes (rows <= 16), each format")
    p.add_argument("--no-xla", action="store_true", help="skip XLA's dequantize-then-dot rows")
    p.add_argument("--profile", action="store_true",
                   help="at batch 1, also run each product once under jax.profiler and report the GPU's busy time per "
                        "product (the sum of its kernels' durations, without the launch gaps between kernels)")
    p.add_argument("--convert-too", action="store_true",
                   help="also time int8 / int4 at batch 1 with int_decode='convert' (int -> float conversions instead "
                        "of the exponent-bits decode)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/matmul_quant.json"), help="JSON of the results")
    return p.parse_args(argv)


def copy_bandwidth(jax, jnp, gib: float = 2.0, reps: int = 10) -> float:
    """GB/s of x + 1 over `gib` GiB of bf16 (read + write)."""
    x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
    add = jax.jit(lambda x: x + 1)
    jax.block_until_ready(add(x))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(add(x))
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times) / 1e9


def device_busy_us(jax, runs: dict, pause_s: float = 0.05) -> tuple[dict, dict]:
    """({label: GPU busy microseconds per product}, {label: {kernel name: microseconds per product}}) for runs
    {label: (compiled call, args, products per call)}: one profiled call each, `pause_s` apart; the GPU's kernels,
    split into bursts at gaps longer than half the pause, are the calls in order, and each burst's kernel durations
    are summed."""
    import glob
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for run, inputs, _ in runs.values():
                time.sleep(pause_s)
                jax.block_until_ready(run(*inputs))
        path = sorted(glob.glob(f"{folder}/plugins/profile/*/*.trace.json.gz"))[-1]
        events = json.load(gzip.open(path))["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    kernels = sorted((e for e in events if e.get("ph") == "X" and processes.get(e["pid"], "").startswith("/device:GPU")),
                     key=lambda e: e["ts"])
    bursts, last_end = [], None  # per burst {kernel name: summed duration}
    for e in kernels:
        if last_end is None or e["ts"] - last_end > pause_s * 1e6 / 2:
            bursts.append({})
        bursts[-1][e["name"]] = bursts[-1].get(e["name"], 0.0) + e["dur"]
        last_end = max(last_end or 0.0, e["ts"] + e["dur"])
    if len(bursts) != len(runs):
        raise RuntimeError(f"{len(bursts)} bursts of GPU kernels in the profile for {len(runs)} calls")
    per_product = [(label, products, burst) for (label, (_, _, products)), burst in zip(runs.items(), bursts)]
    return ({label: sum(burst.values()) / products for label, products, burst in per_product},
            {label: {name: us / products for name, us in burst.items() if us / products >= 0.05}
             for label, products, burst in per_product})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax import lax

    from llmjax.kernels.matmul_quant import MatmulTiles, choose_splits, default_tiles, quantized_matmul_pallas
    from llmjax.quant.formats import quantize, quantized_matmul

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    multiprocessors = int(getattr(device, "core_count", 0) or 132)

    runs = {}  # label -> (compiled call, args, products per call), for --profile

    def timed(product, x, weights, label=None) -> float:
        """Microseconds per product: one jitted call loops `passes` times over every weight copy, so the GPU work
        of a call (>= --min-products products) outweighs dispatching it."""
        passes = max(1, -(-args.min_products // len(weights))) if x.shape[0] <= 16 else 1  # prefill: long enough
        shapes = jax.eval_shape(lambda x, weights: [product(x, w) for w in weights], x, weights)

        def run(x, weights):
            def one_pass(i, outs):
                x_i = x + (i * 1e-3).astype(x.dtype)  # a new input each pass: nothing is hoisted out of the loop
                return [product(x_i, w) for w in weights]

            return lax.fori_loop(0, passes, one_pass, [jnp.zeros(o.shape, o.dtype) for o in shapes])

        run = jax.jit(run)
        jax.block_until_ready(run(x, weights))
        if label is not None:
            runs[label] = (run, (x, weights), passes * len(weights))
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            jax.block_until_ready(run(x, weights))
            times.append(time.perf_counter() - start)
        return statistics.median(times) / (len(weights) * passes) * 1e6

    def relative_error(product, x, q) -> float:
        """max |fused - reference| / max |reference|, the reference in float32 (XLA: dequantize, then dot)."""
        reference = quantized_matmul(x.astype(jnp.float32), q)
        error = jnp.abs(jax.jit(product)(x, q).astype(jnp.float32) - reference).max()
        return float(error / jnp.abs(reference).max())

    def dense(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    def fused(tiles):
        return lambda x, q: quantized_matmul_pallas(x, q, tiles=tiles)

    def sweep_tiles(fmt, rows, k, n, group):
        for variant in SWEEP.get(fmt, ()):
            fields = {**SWEEP_BASE, **variant}
            per_sm = fields.pop("per_sm")
            block_m, block_k = fields["block_m"], fields["block_k"]
            if group % block_k or (block_m == 1 and rows > 1):
                continue
            programs = (rows if block_m == 1 else -(-rows // block_m)) * -(-n // fields["block_n"])
            splits = choose_splits(k // block_k, programs, per_sm * multiprocessors) if per_sm else 1
            fields.setdefault("nf4_lookup", "permute" if fields["swap_ab"] else "gather")
            yield MatmulTiles(**fields, splits=splits)

    bandwidth = copy_bandwidth(jax, jnp) if on_gpu else None

    def write(results, table):  # after every shape, so a run cut short still leaves its figures
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": f"{device.platform} ({device.device_kind})", "copy_gbs": bandwidth,
                                        "multiprocessors": multiprocessors, "results": results, "table": table,
                                        "command": "python -m experiments bench_matmul_quant " + " ".join(
                                            argv if argv is not None else sys.argv[2:])}, indent=2))
    print(f"on {device.platform} ({device.device_kind}" + (f", {multiprocessors} multiprocessors)" if on_gpu else ")")
          + (f"; copy bandwidth (x + 1, 2 GiB bf16) {bandwidth:.0f} GB/s" if bandwidth else ""), flush=True)
    formats = args.formats.split(",")
    group_of = {"int8": None, "int4": args.group, "nf4": 64}
    results = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        quantizers = {fmt: jax.jit(lambda w, fmt=fmt: quantize(w, fmt, group_of[fmt])) for fmt in formats}
        first = quantizers["int4" if "int4" in formats else formats[0]](jnp.zeros((k, n), jnp.float32))
        copies = int(min(64, max(2, math.ceil(args.cold_mib * 2**20 / first.nbytes))))
        floats = [(jax.random.normal(jax.random.key(i), (k, n)) * 0.02).astype(jnp.bfloat16) for i in range(copies)]
        quantized = {fmt: [quantize_one(w.astype(jnp.float32)) for w in floats] for fmt, quantize_one in quantizers.items()}
        for rows in map(int, args.rows.split(",")):
            x = jax.random.normal(jax.random.key(10_000), (rows, k)).astype(jnp.bfloat16)
            runs.clear()
            base = timed(dense, x, floats, "bf16")
            row = {"k": k, "n": n, "rows": rows, "copies": copies, "bf16_us": base, "bf16_bytes": k * n * 2,
                   "bf16_gbs": k * n * 2 / base / 1e3}
            line = f"{k:>5}x{n:<5} rows {rows:3d}: bf16 {base:7.1f} us ({row['bf16_gbs']:4.0f} GB/s)"
            for fmt in formats:
                q = quantized[fmt]
                row[f"{fmt}_bytes"] = q[0].nbytes
                if not args.no_xla and fmt == "int4":
                    row[f"{fmt}_xla_us"] = timed(quantized_matmul, x, q)
                if f"{fmt}_xla_us" in row:
                    line += f" | {fmt} xla {row[f'{fmt}_xla_us']:6.1f}"
                if on_gpu:
                    tiles = default_tiles(rows, k, n, q[0].group_size, fmt=fmt)
                    us = timed(fused(tiles), x, q, fmt)
                    row[f"{fmt}_pallas_us"], row[f"{fmt}_pallas_tiles"] = us, str(tiles)
                    row[f"{fmt}_pallas_gbs"] = q[0].nbytes / us / 1e3
                    row[f"{fmt}_max_rel_error"] = relative_error(fused(tiles), x, q[0])
                    line += f" | {fmt} {us:6.1f} us {base / us:4.2f}x ({row[f'{fmt}_pallas_gbs']:4.0f} GB/s)"
                    if args.convert_too and fmt != "nf4" and rows == 1:
                        converting = dataclasses.replace(tiles, int_decode="convert")
                        row[f"{fmt}_convert_us"] = timed(fused(converting), x, q, f"{fmt}_convert")
                        line += f" convert {row[f'{fmt}_convert_us']:6.1f}"
            for fmt in formats if on_gpu and args.sweep and rows <= 16 else ():
                variants = []
                for i, tiles in enumerate(sweep_tiles(fmt, rows, k, n, quantized[fmt][0].group_size)):
                    try:
                        us = timed(fused(tiles), x, quantized[fmt], f"{fmt}#{i}")
                        error = relative_error(fused(tiles), x, quantized[fmt][0])
                    except Exception as error:  # noqa: BLE001  (a variant this GPU cannot compile is reported)
                        variants.append({"tiles": str(tiles), "error": f"{type(error).__name__}: {str(error)[:300]}"})
                        continue
                    variants.append({"tiles": str(tiles), "us": us, "speedup": base / us, "max_rel_error": error})
                row[f"{fmt}_sweep"] = variants
                best = min((v for v in variants if "us" in v), key=lambda v: v["us"], default=None)
                if best and best["us"] < row[f"{fmt}_pallas_us"]:
                    line += f"\n      best {fmt} variant {best['us']:6.1f} us {best['speedup']:4.2f}x: {best['tiles']}"
            if args.profile and on_gpu and rows == 1:
                try:
                    busy, row["gpu_kernels_us"] = device_busy_us(jax, runs)
                except Exception as error:  # noqa: BLE001  (a profiler missing here costs the column, not the run)
                    busy = {}
                    print(f"  (no profile: {type(error).__name__}: {str(error)[:200]})")
                row["gpu_busy_us"] = busy
                line += "\n      GPU busy per product: " + ", ".join(f"{k} {v:.1f} us" for k, v in busy.items())
            runs.clear()
            results.append(row)
            print(line, flush=True)
            write(results, None)
        del floats, quantized
    lines = ["| K x N | rows | bf16 us | bf16 GB/s | int4 XLA us | " + " | ".join(
        f"{f} us | {f} vs bf16 | {f} GB/s" for f in formats) + " |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in formats) + " |"]
    for r in results:
        xla = r.get("int4_xla_us")
        cells = [f"{r['k']} x {r['n']}", str(r["rows"]), f"{r['bf16_us']:.1f}", f"{r['bf16_gbs']:.0f}",
                 f"{xla:.1f}" if xla else "-"]
        for f in formats:
            us = r.get(f"{f}_pallas_us")
            cells += [f"{us:.1f}", f"{r['bf16_us'] / us:.2f}x", f"{r[f'{f}_pallas_gbs']:.0f}"] if us else ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    write(results, table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
