"""Multi-GPU scaling: tokens/s, MFU and scaling efficiency of a LLaMA-style model under DP, FSDP and FSDP+TP.

Weak scaling: every GPU gets --batch-per-device sequences, so n GPUs train on n times the batch; the
efficiency of a row is its tokens/s over n times the best 1-GPU tokens/s. Run it on a machine of
several GPUs (the lent nvidia-h200-x2 / -x4); device counts the machine lacks are skipped and said so.

    python -m experiments bench_scaling --model llama-1b --seq 2048 --batch-per-device 4 --profile runs/trace
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments bench_scaling", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama-1b", help="model preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a ModelConfig field")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch-per-device", type=int, default=4, help="sequences per GPU per step (weak scaling)")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="GPU counts to measure")
    p.add_argument("--strategies", nargs="+", default=["dp", "fsdp", "fsdp+tp"],
                   help="sharding strategies (fsdp+tp uses tensor=2 and fsdp for the rest)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--profile", type=Path, default=None,
                   help="save a jax.profiler trace (TensorBoard / Perfetto) of 3 steps of the last configuration here")
    p.add_argument("--xla-flags", action="store_true",
                   help="add llmjax.parallel.xla_flags (collective pipelining / overlap); measured in docs/perf.md: "
                        "+1.6 points for FSDP, -4.4 for FSDP+TP on 2 H200s, so off by default")
    p.add_argument("--out", type=Path, default=Path("runs/bench_scaling"), help="folder for results.json and scaling.png")
    return p.parse_args(argv)


def mesh_for(strategy: str, devices: int) -> str | None:
    """The mesh each strategy runs on; None when it cannot use this many devices."""
    if strategy == "fsdp+tp":
        return f"fsdp={devices // 2},tensor=2" if devices >= 2 and devices % 2 == 0 else None
    axis = {"dp": "data", "zero1": "data", "zero2": "data", "fsdp": "fsdp", "tp": "tensor"}[strategy]
    return f"{axis}={devices}"


def measure(model_cfg, train_cfg, strategy: str, mesh: str, devices, args, profile_dir: Path | None = None) -> dict:
    import jax
    import numpy as np

    from llmjax.parallel.plan import Plan
    from llmjax.train.metrics import flops_per_token
    from llmjax.train.step import make_train_step, windows_to_batch

    plan = Plan.create(mesh, strategy, devices=devices)
    batch_size = args.batch_per_device * len(devices)
    plan.check_batch(batch_size)
    state = plan.init_state(model_cfg, train_cfg, jax.random.key(0))
    step = make_train_step(model_cfg, train_cfg, plan)
    windows = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (batch_size, args.seq + 1), dtype=np.int32)
    batch = jax.device_put(windows_to_batch(windows), plan.batch_sharding())
    memory = step.lower(state, batch).compile().memory_analysis()
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    float(metrics["loss"])
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    loss = float(metrics["loss"])  # waits for the last step
    seconds = (time.perf_counter() - start) / args.steps
    if profile_dir is not None:
        with jax.profiler.trace(str(profile_dir)):
            for _ in range(3):
                state, metrics = step(state, batch)
            float(metrics["loss"])
    tokens_per_second = batch_size * args.seq / seconds
    peak = 989e12 * len(devices)  # bf16 dense peak of H100 / H200
    per_device_bytes = memory.argument_size_in_bytes + memory.temp_size_in_bytes if memory else None
    del state, batch
    gc.collect()
    return {
        "strategy": strategy, "mesh": mesh, "devices": len(devices), "batch": batch_size, "seq": args.seq,
        "ms_per_step": 1e3 * seconds, "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * flops_per_token(model_cfg, args.seq) / peak, "loss": loss,
        "gib_per_device": per_device_bytes / 2**30 if per_device_bytes else None,
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    counts = sorted({r["devices"] for r in rows})
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    width = 0.8 / len(strategies)
    for i, strategy in enumerate(strategies):
        for j, n in enumerate(counts):
            row = next((r for r in rows if r["strategy"] == strategy and r["devices"] == n), None)
            if row is None:
                continue
            x = j + (i - (len(strategies) - 1) / 2) * width
            axes.bar(x, row["tokens_per_second"] / 1e3, width, color=f"C{i}", label=strategy if j == 0 else None)
            axes.text(x, row["tokens_per_second"] / 1e3, f"{row['efficiency']:.0%}", ha="center", va="bottom", fontsize=7)
    axes.set_xticks(range(len(counts)), [f"{n} GPU" + ("s" if n > 1 else "") for n in counts])
    axes.set_ylabel("thousand tokens / s (label: scaling efficiency)")
    axes.set_title(title)
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmjax.parallel.xla_flags import set_gpu_training_flags

    if args.xla_flags:
        set_gpu_training_flags()
    import jax

    from llmjax.experiments.train import parse_overrides
    from llmjax.config import TrainConfig, get_config

    model_cfg = get_config(args.model, **parse_overrides(args.set))
    train_cfg = TrainConfig(warmup_steps=0, total_steps=1000)
    available = jax.device_count()
    skipped = [n for n in args.devices if n > available]
    if skipped:
        print(f"this machine has {available} device(s): skipping {skipped} (run on a larger machine for those rows)")
    configs = [(n, s, mesh_for(s, n)) for n in args.devices if n <= available for s in args.strategies]
    configs = [(n, s, mesh) for n, s, mesh in configs if mesh is not None and not (n == 1 and s != args.strategies[0])]
    rows = []
    print(f"{model_cfg.name}: {args.batch_per_device} x {args.seq} tokens per GPU, {jax.devices()[0].device_kind}")
    print(f"{'strategy':>8} {'mesh':>18} {'GPUs':>4} {'ms/step':>8} {'tok/s':>10} {'MFU':>6} {'GiB/GPU':>8} {'eff.':>6}")
    for index, (n, strategy, mesh) in enumerate(configs):
        last = index == len(configs) - 1
        row = measure(model_cfg, train_cfg, strategy, mesh, jax.devices()[:n], args,
                      profile_dir=args.profile if last else None)
        rows.append(row)
        base = max(r["tokens_per_second"] for r in rows if r["devices"] == 1) if rows[0]["devices"] == 1 else None
        row["efficiency"] = row["tokens_per_second"] / (n * base) if base else float("nan")
        gib = f"{row['gib_per_device']:8.1f}" if row["gib_per_device"] else f"{'-':>8}"
        print(f"{strategy:>8} {mesh:>18} {n:>4} {row['ms_per_step']:8.1f} {row['tokens_per_second']:10,.0f} "
              f"{row['mfu']:6.1%} {gib} {row['efficiency']:6.1%}", flush=True)
        jax.clear_caches()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": model_cfg.name, "device": jax.devices()[0].device_kind, "device_count": available,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "skipped_device_counts": skipped, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "scaling.png", f"{model_cfg.name} on {jax.devices()[0].device_kind}, weak scaling")
    print(f"wrote {args.out}/results.json and scaling.png" + (f"; trace in {args.profile}" if args.profile else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
