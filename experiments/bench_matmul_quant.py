"""Fused dequantize-matmul (Pallas) vs XLA's dequantize-then-dot vs the bf16 matmul, decode and prefill shapes (GPU)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # Llama-3-8B's q/o, gate/up, down


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_matmul_quant",
        description="Time x [rows, K] @ W [K, N] for W in bf16, and quantized to int8 / int4 / nf4 through XLA "
        "(dequantize, then dot) and through the fused Pallas kernel (kernels/matmul_quant.py). Batch-1 decode is "
        "bound by the bytes of W, which int4 cuts to a quarter. On CPUs only the XLA paths run (the kernel would "
        "run in the Pallas interpreter).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rows", default="1,8,512", help="rows of x (1 / 8: decode; 512: prefill), comma-separated")
    p.add_argument("--formats", default="int8,int4,nf4", help="quantization formats, comma-separated")
    p.add_argument("--group", type=int, default=128, help="group size (nf4 uses 64)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN weight shapes")
    p.add_argument("--out", type=Path, default=Path("runs/bench/matmul_quant.json"), help="JSON of the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from kernels.matmul_quant import quantized_matmul_pallas
    from llmjax.quant.formats import quantize, quantized_matmul

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"

    def timed(fn, *inputs) -> float:
        jax.block_until_ready(fn(*inputs))
        start = time.perf_counter()
        for _ in range(args.iters):
            out = fn(*inputs)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / args.iters * 1e6  # microseconds

    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    xla = jax.jit(quantized_matmul)
    fused = jax.jit(quantized_matmul_pallas)
    results = []
    print(f"on {device.platform} ({device.device_kind})", flush=True)
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w = (jax.random.normal(jax.random.key(0), (k, n)) * 0.02).astype(jnp.bfloat16)
        for rows in map(int, args.rows.split(",")):
            x = jax.random.normal(jax.random.key(1), (rows, k)).astype(jnp.bfloat16)
            base = timed(dense, x, w)
            row = {"k": k, "n": n, "rows": rows, "bf16_us": base, "bf16_bytes": w.size * 2}
            line = f"{k}x{n} rows {rows:4d}: bf16 {base:8.1f} us"
            for fmt in args.formats.split(","):
                q = quantize(w.astype(jnp.float32), fmt, 64 if fmt == "nf4" else args.group)
                row[f"{fmt}_bytes"] = q.nbytes
                row[f"{fmt}_xla_us"] = timed(xla, x, q)
                line += f" | {fmt} xla {row[f'{fmt}_xla_us']:8.1f}"
                if on_gpu:
                    row[f"{fmt}_pallas_us"] = timed(fused, x, q)
                    line += f" pallas {row[f'{fmt}_pallas_us']:8.1f} ({base / row[f'{fmt}_pallas_us']:.2f}x bf16)"
            results.append(row)
            print(line, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": f"{device.platform} ({device.device_kind})", "results": results,
                                    "command": "python -m experiments bench_matmul_quant " + " ".join(
                                        argv if argv is not None else sys.argv[2:])}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
