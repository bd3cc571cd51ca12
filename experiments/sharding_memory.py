"""Per-device memory of a training step under DP, ZeRO-1, ZeRO-2, FSDP and TP, from the real shardings.

For a model preset and N devices, each strategy's train step is compiled (nothing runs, so N simulated
CPU devices do) and split into parameters, gradients and optimizer state (exact bytes of each array's
shard) and activations (XLA's temporary buffers minus the gradients, from compiled.memory_analysis()),
next to the ZeRO paper's formulas for our float32 layout: 4 bytes of parameters, 4 of gradients and 8 of
Adam moments per parameter, Psi parameters over N devices:
    DP 16 Psi    ZeRO-1 8 Psi + 8 Psi / N    ZeRO-2 4 Psi + 12 Psi / N    FSDP (ZeRO-3) and TP 16 Psi / N

    python -m experiments sharding_memory --model llama-1b --devices 8 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

STRATEGY_MESH = {"dp": "data", "zero1": "data", "zero2": "data", "fsdp": "fsdp", "tp": "tensor"}
GIB = 2**30


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments sharding_memory", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama-1b", help="model preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a ModelConfig field")
    p.add_argument("--devices", type=int, default=8,
                   help="devices to shard over (simulated on CPU when the machine has fewer)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, all devices together")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGY_MESH), choices=list(STRATEGY_MESH),
                   help="strategies to compare (each on a mesh of one axis of --devices)")
    p.add_argument("--out", type=Path, default=Path("runs/sharding_memory"), help="folder for results.json and memory.png")
    return p.parse_args(argv)


def shard_bytes(abstract_tree, sharding_tree) -> int:
    """Bytes one device holds of a tree of arrays laid out by a matching tree of shardings."""
    import jax

    leaves = jax.tree.leaves(abstract_tree)
    shardings = jax.tree.leaves(sharding_tree)
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shardings, strict=True))


def zero_formula(strategy: str, params: int, ways: int) -> float:
    """Bytes per device of parameters + gradients + Adam state (float32 everywhere), as in the ZeRO paper."""
    p, g, o = 4 * params, 4 * params, 8 * params
    return {"dp": p + g + o, "zero1": p + g + o / ways, "zero2": p + (g + o) / ways,
            "fsdp": (p + g + o) / ways, "tp": (p + g + o) / ways}[strategy]


def measure(model_cfg, train_cfg, strategy: str, args) -> dict:
    import jax
    import numpy as np

    from llmjax.config import count_params
    from llmjax.parallel.plan import Plan
    from llmjax.train.step import init_train_state, make_train_step

    mesh = f"{STRATEGY_MESH[strategy]}={args.devices}"
    plan = Plan.create(mesh, strategy, devices=jax.devices()[: args.devices])
    plan.check_batch(args.batch)
    shardings = plan.state_shardings(model_cfg, train_cfg)
    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, train_cfg, jax.random.key(0)))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = {name: jax.ShapeDtypeStruct((args.batch, args.seq), np.int32, sharding=plan.batch_sharding())
             for name in ("inputs", "targets")}
    memory = make_train_step(model_cfg, train_cfg, plan).lower(abstract, batch).compile().memory_analysis()
    params = shard_bytes(abstract.params, shardings.params)
    gradients = shard_bytes(abstract.params, plan.gradient_shardings(model_cfg))
    optimizer = shard_bytes(abstract.opt_state, shardings.opt_state)
    temp = memory.temp_size_in_bytes
    return {
        "strategy": strategy, "mesh": mesh, "params": params, "gradients": gradients, "optimizer": optimizer,
        "activations": max(temp - gradients, 0), "xla_arguments": memory.argument_size_in_bytes, "xla_temp": temp,
        "formula_states": zero_formula(strategy, count_params(model_cfg, padded_vocab=True), args.devices),
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ["params", "gradients", "optimizer", "activations"]
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    bottoms = [0.0] * len(rows)
    for i, part in enumerate(parts):
        heights = [row[part] / GIB for row in rows]
        axes.bar(range(len(rows)), heights, bottom=bottoms, color=f"C{i}", label=part)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes.plot(range(len(rows)), [row["formula_states"] / GIB for row in rows], "k_", markersize=28, mew=2,
              label="ZeRO formula: params + grads + optimizer")
    axes.set_xticks(range(len(rows)), [f"{row['strategy']}\n{row['mesh']}" for row in rows])
    axes.set_ylabel("GiB per device")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # CPU: simulate the devices
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    import jax

    from llmjax.experiments.train import parse_overrides
    from llmjax.config import TrainConfig, count_params, get_config

    if jax.device_count() < args.devices:
        print(f"--devices {args.devices}: this machine has {jax.device_count()}", file=sys.stderr)
        return 2
    model_cfg = get_config(args.model, **parse_overrides(args.set))
    train_cfg = TrainConfig()
    psi = count_params(model_cfg)
    print(f"{model_cfg.name}: {psi / 1e9:.3f}B parameters, batch {args.batch} x {args.seq}, {args.devices} devices "
          f"({jax.devices()[0].platform}); GiB per device")
    print(f"{'strategy':>8} {'mesh':>9} {'params':>7} {'grads':>7} {'optim':>7} {'activ.':>7} {'total':>7} {'formula':>8}")
    rows = []
    for strategy in args.strategies:
        row = measure(model_cfg, train_cfg, strategy, args)
        rows.append(row)
        total = row["params"] + row["gradients"] + row["optimizer"] + row["activations"]
        print(f"{strategy:>8} {row['mesh']:>9} " + " ".join(
            f"{row[k] / GIB:7.2f}" for k in ("params", "gradients", "optimizer", "activations"))
            + f" {total / GIB:7.2f} {row['formula_states'] / GIB:8.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"model": model_cfg.name, "params": psi, "devices": args.devices,
                                                       "batch": args.batch, "seq": args.seq, "rows": rows}, indent=2))
    plot(rows, args.out / "memory.png", f"{model_cfg.name}, {args.devices} devices, batch {args.batch} x {args.seq}")
    print(f"formula = params + grads + optimizer by the ZeRO paper; activations = XLA temp - gradients\n"
          f"wrote {args.out}/results.json and memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
