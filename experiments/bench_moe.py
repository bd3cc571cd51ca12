"""Benchmark Mixture-of-Experts dispatch (dense capacity vs ragged_dot vs our grouped matmul) and compare an MoE with a dense model of equal active FLOPs.

Three parts, each written to the JSON as soon as it is done:

1. Grouped matmul: one expert projection [M, K] x [E, K, N] (bfloat16), our Pallas kernel
   (`kernels.grouped_matmul`) against `jax.lax.ragged_dot` and against one dense [M, K] x [K, N]
   matmul of the same FLOPs, forward and forward + backward, on balanced and skewed groups.
   "ours (padded)" is the kernel on the padded layout the MoE layer builds directly; "ours" adds
   the copies into and out of that layout (what a caller with ragged rows pays).
2. The MoE layer (router, dispatch, SwiGLU experts, combine), forward + backward, in tokens/s:
   capacity (GShard einsum, factor 1.25) vs dropless ragged_dot vs dropless with our kernel, and
   the dense SwiGLU MLP with d_ff = top-k x expert width (the same expert FLOPs, no routing).
3. Quality: `llama-moe-mini` (8 experts top-2) against the same model with one dense MLP of
   top-k x expert width (equal active parameters and FLOPs per token), trained the same number of
   steps on the default corpus (the quickstart's shards of the Python standard library); train and
   validation loss curves of both in one PNG.

Times are medians over --repeats timed runs of --inner calls each, after a warm-up. The kernel
needs a CUDA GPU; elsewhere parts 1 and 2 run at tiny sizes with the kernel in interpret mode (for
checking the script, not for figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

DEFAULT_KERNEL_SIZES = "32768x1024x2048,32768x4096x14336"  # MxKxN: (tokens * top-k) x d_model x expert width
CPU_KERNEL_SIZES = "96x32x48"
SWEEP = [  # (block_m, block_n, block_k, num_warps, num_stages) of the forward kernel
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 32, 4, 4),
    (256, 128, 64, 8, 3), (128, 64, 64, 4, 3),
]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_moe",
        description="Time the grouped matmul and the MoE layer's dispatch paths on this machine's first device, "
        "and train an MoE against a dense model of equal active FLOPs; print tables, write JSON and PNGs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench/moe.json"),
                   help="JSON results; charts go next to it (moe.png: throughput, moe_quality.png: loss curves)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--kernel-sizes", default=None,
                   help=f"comma-separated MxKxN grouped-matmul problems (default on a GPU: {DEFAULT_KERNEL_SIZES})")
    p.add_argument("--layer", default="16x1024x1024x2048",
                   help="MoE layer problem BATCHxSEQxD_MODELxEXPERT_WIDTH (on CPUs: 2x16x32x48)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement; the median is reported")
    p.add_argument("--inner", type=int, default=5, help="back-to-back calls per timed run")
    p.add_argument("--kernel-impls", default="ours (padded),ours,ragged_dot,dense matmul",
                   help="which grouped-matmul rows to time (results replace those rows in an existing --out JSON)")
    p.add_argument("--sweep", action="store_true", help="also time the forward kernel at several tile configurations")
    p.add_argument("--skip-kernel", action="store_true")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--quality", action="store_true", help="run part 3 (trains two models)")
    p.add_argument("--data", type=Path, default=Path("runs/quickstart/tokens"),
                   help="token shards for part 3 (the quickstart's: the Python standard library)")
    p.add_argument("--model", default="llama-moe-mini", help="MoE preset for part 3; the dense twin is derived from it")
    p.add_argument("--models", default="MoE,dense", help="which of part 3's two models to train (results merge "
                   "into an existing --out JSON, so the two may run separately)")
    p.add_argument("--moe-impl", default=None, help="dispatch for part 3 (default: pallas on a GPU, ragged_dot elsewhere)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench/moe_quality"),
                   help="part 3's run folders (checkpoints, metrics), one per model; replaced on each run")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


# --- part 1: the grouped matmul ----------------------------------------------------------

def group_sizes_for(rows: int, experts: int, skewed: bool):
    """Balanced: rows / experts each. Skewed: a fixed uneven split (one expert with a third, one empty)."""
    import numpy as np

    if not skewed:
        sizes = np.full(experts, rows // experts)
    else:
        weights = np.array([8, 0, 3, 1, 6, 2, 4, 5] * (experts // 8 + 1), float)[:experts]
        sizes = np.floor(weights / weights.sum() * rows).astype(int)
    sizes[-1] += rows - sizes.sum()
    return sizes


def bench_kernel(args, on_gpu: bool, report: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llmjax.experiments.bench_kernels import median_seconds
    from llmjax.kernels.grouped_matmul import (
        TileConfig,
        default_tiles,
        group_layout,
        grouped_matmul,
        grouped_matmul_padded,
        grouped_matmul_reference,
        to_padded,
    )

    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    rows_out = report.setdefault("kernel", [])
    sizes_text = args.kernel_sizes or (DEFAULT_KERNEL_SIZES if on_gpu else CPU_KERNEL_SIZES)
    for size in sizes_text.split(","):
        m, k, n = (int(v) for v in size.split("x"))
        rng = np.random.default_rng(0)
        lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
        rhs = jnp.asarray(rng.standard_normal((args.experts, k, n)) / np.sqrt(k), dtype)
        dense_rhs = rhs[0]  # [K, N]: one matmul of the same FLOPs
        cotangent = jnp.asarray(rng.standard_normal((m, n)), dtype)
        flops = 2 * m * k * n
        for skewed in (False, True):
            sizes = jnp.asarray(group_sizes_for(m, args.experts, skewed), jnp.int32)
            tiles = default_tiles(k, n, interpret=not on_gpu)
            layout = group_layout(sizes, m, tiles.block_m)
            lhs_padded = to_padded(lhs, layout)
            cotangent_padded = to_padded(cotangent, layout)
            candidates = {  # (function, lhs, rhs, cotangent)
                "ours (padded)": (lambda a, b: grouped_matmul_padded(a, b, layout, tiles), lhs_padded, rhs,
                                  cotangent_padded),
                "ours": (lambda a, b: grouped_matmul(a, b, sizes, tiles=tiles), lhs, rhs, cotangent),
                "ragged_dot": (lambda a, b: grouped_matmul_reference(a, b, sizes), lhs, rhs, cotangent),
                "dense matmul": (lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype),
                                 lhs, dense_rhs, cotangent),
            }
            for name, (fn, a, b, ct) in candidates.items():
                if name not in args.kernel_impls.split(","):
                    continue
                row = {"impl": name, "m": m, "k": k, "n": n, "experts": args.experts, "skewed": skewed,
                       "dtype": jnp.dtype(dtype).name}
                try:
                    forward = jax.jit(fn)
                    backward = jax.jit(jax.grad(lambda a, b: jnp.sum((fn(a, b) * ct).astype(jnp.float32)), argnums=(0, 1)))
                    row["fwd_ms"] = 1e3 * median_seconds(forward, [(a, b)], args.repeats, args.inner)
                    row["fwd_bwd_ms"] = row["fwd_ms"] + 1e3 * median_seconds(backward, [(a, b)], args.repeats, args.inner)
                    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                    row["fwd_bwd_tflops"] = 3 * flops / row["fwd_bwd_ms"] / 1e9
                except Exception as error:  # noqa: BLE001 - one failing implementation must not end the benchmark
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                key = lambda r: (r["impl"], r["m"], r["k"], r["n"], r["skewed"])  # noqa: E731
                rows_out[:] = [r for r in rows_out if key(r) != key(row)] + [row]
                print(_kernel_line(row), flush=True)
    if args.sweep:
        m, k, n = (int(v) for v in sizes_text.split(",")[0].split("x"))
        rng = np.random.default_rng(0)
        lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
        rhs = jnp.asarray(rng.standard_normal((args.experts, k, n)) / np.sqrt(k), dtype)
        sizes = jnp.asarray(group_sizes_for(m, args.experts, False), jnp.int32)
        sweep = report.setdefault("kernel_sweep", [])
        for block_m, block_n, block_k, warps, stages in SWEEP:
            tiles = TileConfig(block_m, block_n, block_k, warps, stages, interpret=not on_gpu)
            layout = group_layout(sizes, m, block_m)
            lhs_padded = to_padded(lhs, layout)
            row = {"m": m, "k": k, "n": n, "block_m": block_m, "block_n": block_n, "block_k": block_k,
                   "num_warps": warps, "num_stages": stages}
            try:
                fn = jax.jit(lambda a, b, layout=layout, tiles=tiles: grouped_matmul_padded(a, b, layout, tiles))
                row["fwd_ms"] = 1e3 * median_seconds(fn, [(lhs_padded, rhs)], args.repeats, args.inner)
                row["fwd_tflops"] = 2 * m * k * n / row["fwd_ms"] / 1e9
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            sweep.append(row)
            print(f"  sweep {block_m}x{block_n}x{block_k} w{warps} s{stages}: "
                  + (f"{row['fwd_tflops']:.0f} TFLOP/s" if "fwd_tflops" in row else row["error"]), flush=True)


def _kernel_line(row: dict) -> str:
    what = f"  gmm {row['m']}x{row['k']}x{row['n']} {'skewed' if row['skewed'] else 'balanced'} {row['impl']:14}"
    if "error" in row:
        return f"{what}: {row['error']}"
    return (f"{what}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_tflops']:.0f} TFLOP/s), "
            f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms ({row['fwd_bwd_tflops']:.0f} TFLOP/s)")


# --- part 2: the MoE layer ---------------------------------------------------------------

def layer_config(args, d_model: int, width: int, impl: str):
    from llmjax.config import ModelConfig

    return ModelConfig(vocab_size=128, d_model=d_model, num_layers=1, num_heads=8, d_ff=args.top_k * width,
                       norm="rmsnorm", positions="rope", activation="swiglu", attention_bias=False, mlp_bias=False,
                       num_experts=args.experts, experts_per_token=args.top_k, expert_d_ff=width, moe_impl=impl,
                       capacity_factor=1.25, compute_dtype="bfloat16", param_dtype="bfloat16")


def bench_layer(args, on_gpu: bool, report: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llmjax.experiments.bench_kernels import median_seconds
    from llmjax.model.layers import mlp, mlp_spec
    from llmjax.model.moe import moe_layer, moe_spec
    from llmjax.model.params import init_from_specs

    batch, seq, d_model, width = (int(v) for v in (args.layer if on_gpu else "2x16x32x48").split("x"))
    tokens = batch * seq
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, seq, d_model)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    expert_flops = 2 * tokens * args.top_k * 3 * d_model * width  # forward, SwiGLU: three projections
    rows = report.setdefault("layer", [])
    for impl in ("capacity", "ragged_dot", "pallas", "dense"):
        cfg = layer_config(args, d_model, width, "ragged_dot" if impl == "dense" else impl)
        if impl == "dense":
            params = init_from_specs(mlp_spec(cfg), jax.random.key(0))
            apply = lambda p, x, cfg=cfg: mlp(p, x, cfg)  # noqa: E731
        else:
            params = init_from_specs(moe_spec(cfg), jax.random.key(0))
            apply = lambda p, x, cfg=cfg: moe_layer(p, x, cfg)[0]  # noqa: E731
        forward = jax.jit(apply)
        train = jax.jit(jax.grad(lambda p, x, apply=apply: jnp.sum((apply(p, x) * cotangent).astype(jnp.float32)),
                                 argnums=(0, 1)))
        row = {"impl": impl, "batch": batch, "seq": seq, "d_model": d_model, "expert_width": width,
               "experts": args.experts, "top_k": args.top_k}
        try:
            row["fwd_ms"] = 1e3 * median_seconds(forward, [(params, x)], args.repeats, args.inner)
            row["fwd_bwd_ms"] = 1e3 * median_seconds(train, [(params, x)], args.repeats, args.inner)
            row["fwd_bwd_tokens_per_s"] = tokens / row["fwd_bwd_ms"] * 1e3
            row["fwd_bwd_expert_tflops"] = 3 * expert_flops / row["fwd_bwd_ms"] / 1e9
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        rows.append(row)
        print(f"  layer {impl:10}: " + (row["error"] if "error" in row else
              f"fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms, "
              f"{row['fwd_bwd_tokens_per_s']:,.0f} tokens/s ({row['fwd_bwd_expert_tflops']:.0f} TFLOP/s)"), flush=True)


# --- part 3: quality -----------------------------------------------------------------------

def bench_quality(args, on_gpu: bool, report: dict) -> None:
    from llmjax.experiments.train import open_data
    from llmjax.config import TrainConfig, count_params, get_config
    from llmjax.train.loop import RunConfig, read_metrics, train

    train_data, validation_data, _ = open_data(args.data)
    vocab_size = int(train_data.index["tokenizer"]["vocab_size"])
    impl = args.moe_impl or ("pallas" if on_gpu else "ragged_dot")
    moe = get_config(args.model, vocab_size=vocab_size, moe_impl=impl, max_seq_len=max(args.seq, 64),
                     compute_dtype="bfloat16" if on_gpu else "float32")
    dense = moe.replace(num_experts=0, d_ff=moe.experts_per_token * moe.expert_width, name=f"{args.model}-dense")
    train_cfg = TrainConfig(lr=args.lr, warmup_steps=min(50, args.steps), total_steps=args.steps)
    runs = report.setdefault("quality", {"data": str(args.data), "steps": args.steps, "batch": args.batch,
                                         "seq": args.seq, "lr": args.lr, "models": {}})
    for label, cfg in (("MoE", moe), ("dense", dense)):
        if label not in args.models.split(","):
            continue
        run_dir = args.runs_dir / label
        shutil.rmtree(run_dir, ignore_errors=True)
        run = RunConfig(run_dir=run_dir, batch_size=args.batch, seq_len=args.seq, eval_every=args.eval_every,
                        eval_batches=8, save_every=10**9, keep_last=1, sample_tokens=0, progress=False,
                        log_every=10)
        try:
            summary = train(cfg, train_cfg, run, train_data, validation_data)
        except Exception as error:  # noqa: BLE001 - our kernel failing here must not lose the comparison
            if cfg.moe_impl != "pallas":
                raise
            runs["pallas_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            print(f"  quality {label}: the pallas path failed ({runs['pallas_error']}); retrying with ragged_dot")
            cfg = cfg.replace(moe_impl="ragged_dot")
            shutil.rmtree(run_dir, ignore_errors=True)
            summary = train(cfg, train_cfg, run, train_data, validation_data)
        records = read_metrics(run_dir)
        runs["models"][label] = {
            "config": {"num_experts": cfg.num_experts, "experts_per_token": cfg.experts_per_token,
                       "d_ff": cfg.d_ff, "expert_width": cfg.expert_width, "moe_impl": cfg.moe_impl},
            "params": count_params(cfg), "active_params": count_params(cfg, active=True),
            "final_val_loss": summary.get("val_loss"),
            "train": [(r["step"], r["loss"]) for r in records if r["kind"] == "train"],
            "validation": [(r["step"], r["loss"]) for r in records if r["kind"] == "validation"],
            "tokens_per_second": [r.get("tokens_per_second") for r in records if r["kind"] == "train"][-1:],
            "moe_load_balance_loss": [r.get("moe/load_balance_loss") for r in records if r["kind"] == "train"][-1:],
        }
        print(f"  quality {label:5}: final validation loss {summary.get('val_loss'):.4f}", flush=True)


# --- report ------------------------------------------------------------------------------

def plot(report: dict, path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    kernel = [r for r in report.get("kernel", []) if "error" not in r and not r["skewed"]]
    layer = [r for r in report.get("layer", []) if "error" not in r]
    if kernel or layer:
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120)
        sizes = sorted({(r["m"], r["k"], r["n"]) for r in kernel})
        impls = ["ours (padded)", "ours", "ragged_dot", "dense matmul"]
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = [next((r["fwd_bwd_tflops"] for r in kernel if (r["m"], r["k"], r["n"]) == s and r["impl"] == impl), 0)
                      for s in sizes]
            axes[0].bar([j + i * width for j in range(len(sizes))], values, width, label=impl)
        axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{m}x{k}x{n}" for m, k, n in sizes])
        axes[0].set_ylabel("TFLOP/s (forward + backward)")
        axes[0].set_title("grouped matmul, balanced groups")
        axes[0].legend(fontsize=8)
        axes[1].bar([r["impl"] for r in layer], [r["fwd_bwd_tokens_per_s"] / 1e6 for r in layer],
                    color=["gray", "tab:orange", "tab:blue", "tab:green"][: len(layer)])
        axes[1].set_ylabel("million tokens/s (forward + backward)")
        if layer:
            r = layer[0]
            axes[1].set_title(f"MoE layer {r['batch']}x{r['seq']} tokens, d {r['d_model']}, "
                              f"{r['experts']}x{r['expert_width']} top-{r['top_k']}")
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    quality = report.get("quality", {}).get("models")
    if quality:
        figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
        for (label, run), color in zip(quality.items(), ("tab:blue", "tab:gray")):
            if run["train"]:
                steps, losses = zip(*run["train"])
                axes.plot(steps, losses, "-", color=color, alpha=0.4, linewidth=1)
            if run["validation"]:
                steps, losses = zip(*run["validation"])
                axes.plot(steps, losses, "o-", color=color, markersize=3,
                          label=f"{label} ({run['active_params'] / 1e6:.1f}M active of {run['params'] / 1e6:.1f}M): "
                                f"val {losses[-1]:.3f}")
        axes.set_xlabel("step")
        axes.set_ylabel("loss (nats / token); line: train, dots: validation")
        axes.set_title("MoE vs dense of equal active FLOPs (default corpus)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        quality_path = path.with_name(path.stem + "_quality.png")
        figure.savefig(quality_path)
        plt.close(figure)
        written.append(quality_path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report = {**previous, "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "python": platform.python_version()}
    report.setdefault("commands", []).append("python -m experiments bench_moe " + " ".join(argv or sys.argv[2:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: args.out.write_text(json.dumps(report, indent=1))  # noqa: E731 - after each part
    print(f"device: {device.device_kind}")
    if not args.skip_kernel:
        bench_kernel(args, on_gpu, report)
        save()
    if not args.skip_layer:
        bench_layer(args, on_gpu, report)
        save()
    if args.quality:
        if "quality" in report and report["quality"].get("steps") != args.steps:
            del report["quality"]  # another step count: not comparable
        bench_quality(args, on_gpu, report)
        save()
    written = [] if args.no_plot else plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out}" + "".join(f", {p}" for p in written))
    return 0
