"""µP width sweep: training loss against learning rate at several widths, standard vs µP (does the best rate stay put?).

    python -m experiments mup_sweep --data runs/tokens --widths 256,512,1024,2048 --steps 300    # the GPU sweep
    python -m experiments mup_sweep --quick                                                      # a CPU smoke run

For each parametrization and width (d_model = width, heads = width / --head-dim, d_ff = width x the preset's
ratio, --layers blocks, untied head), one compiled step trains every learning rate of the grid at once: the model and
its AdamW state are vmapped over the rates, all starting from the same initialization and reading the same batches.
The update is optax's AdamW at rate 1 times the rate (warmup and cosine schedule included), which is AdamW at that
rate. µP runs use `ModelConfig(mup_base_width=--base-width)` (llmjax.model.mup); at the base width µP and the standard
parametrization differ only in the attention scale. The loss of a run is the mean training loss of its last
--average steps (inf once it diverged). Writes sweep.json (losses, the best rate per width, how many grid steps the
best rate moves from the narrowest to the widest model) and sweep.png (loss vs rate, one panel per parametrization).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

PROG = "python -m experiments mup_sweep"
QUICK = dict(model="llama-tiny", widths="16,32", head_dim=8, layers=1, lrs="0.002,0.008,0.032", steps=4, batch=2,
             seq=16, warmup=1, average=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama-125m",
                   help="the preset whose family (norms, activation, positions) is swept")
    p.add_argument("--data", type=Path, default=None,
                   help="a tokenize output folder (train/ shards); default: random tokens (a smoke test only)")
    p.add_argument("--widths", default="256,512,1024,2048", help="comma-separated d_model values")
    p.add_argument("--base-width", type=int, default=None, help="µP's base width (default: the narrowest)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (heads = width / head dim)")
    p.add_argument("--layers", type=int, default=4, help="blocks of every model")
    p.add_argument("--lrs", default="1e-4,2e-4,4e-4,8e-4,1.6e-3,3.2e-3,6.4e-3,1.28e-2",
                   help="comma-separated peak learning rates (a grid of factors of 2 makes 'grid steps' meaningful)")
    p.add_argument("--parametrizations", default="standard,mup", help="comma-separated: standard, mup")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps (then cosine to 10%%)")
    p.add_argument("--average", type=int, default=30, help="the last this many steps' losses averaged")
    p.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    p.add_argument("--quick", action="store_true", help="a tiny CPU run (llama-tiny, widths 16 and 32, 3 rates, 4 "
                   "steps; flags left at their defaults take the quick values)")
    p.add_argument("--out", type=Path, default=Path("runs/mup_sweep"), help="folder for sweep.json and sweep.png")
    return p


def parse_args(argv):
    from llmjax.experiments._flags import apply_quick

    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        apply_quick(p, args, QUICK)
    try:
        args.width_list = sorted(int(w) for w in str(args.widths).split(","))
        args.lr_list = sorted(float(x) for x in str(args.lrs).split(","))
    except ValueError:
        p.error(f"--widths {args.widths!r} / --lrs {args.lrs!r}: expected comma-separated numbers")
    args.kinds = [k.strip() for k in args.parametrizations.split(",") if k.strip()]
    if not set(args.kinds) <= {"standard", "mup"} or not args.kinds:
        p.error(f"--parametrizations {args.parametrizations!r}: choose from standard, mup")
    if min(args.width_list) < 1 or any(w % args.head_dim for w in args.width_list):
        p.error(f"--widths {args.widths!r}: every width must be a positive multiple of --head-dim {args.head_dim}")
    if min(args.lr_list) <= 0:
        p.error(f"--lrs {args.lrs!r}: learning rates must be positive")
    for name in ("steps", "batch", "seq", "layers", "average"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be a positive integer")
    if args.average > args.steps:
        p.error(f"--average={args.average}: at most --steps={args.steps}")
    args.base_width = args.base_width or args.width_list[0]
    return args


def model_at(preset, width: int, args, kind: str):
    """The swept family at this width (llmjax.scaling.ladder_config: heads of --head-dim, d_ff in the preset's ratio,
    key/value heads that divide the heads, an untied head), µP's base width set for kind "mup"."""
    from llmjax.scaling import ladder_config

    cfg = ladder_config(preset, args.layers, width, head_dim=args.head_dim, seq_len=args.seq,
                        vocab_size=preset.vocab_size)
    return dataclasses.replace(cfg, mup_base_width=args.base_width if kind == "mup" else 0)


def sweep_losses(cfg, args, batches) -> list[list[float]]:
    """[rates][steps] training losses of every learning rate, trained together (vmapped)."""
    import jax
    import jax.numpy as jnp
    import optax

    from llmjax.config import TrainConfig
    from llmjax.model import init_params
    from llmjax.train.optim import make_optimizer
    from llmjax.train.step import accumulated_gradients, windows_to_batch

    train_cfg = TrainConfig(lr=1.0, warmup_steps=min(args.warmup, args.steps - 1), total_steps=args.steps)
    optimizer = make_optimizer(train_cfg, model_cfg=cfg)
    rates = jnp.asarray(args.lr_list, jnp.float32)  # [rates]
    params = init_params(cfg, jax.random.key(args.seed))
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (len(rates), *p.shape)), params)
    opt_state = jax.vmap(optimizer.init)(params)

    def one_rate(params, opt_state, rate, windows):
        grads, sums = accumulated_gradients(params, windows_to_batch(windows), cfg, train_cfg)
        tokens = jnp.maximum(sums["tokens"], 1.0)
        updates, opt_state = optimizer.update(jax.tree.map(lambda g: g / tokens, grads), opt_state, params)
        updates = jax.tree.map(lambda u: u * rate.astype(u.dtype), updates)  # AdamW at rate 1, times the rate
        return optax.apply_updates(params, updates), opt_state, sums["nll_sum"] / tokens

    step = jax.jit(jax.vmap(one_rate, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1))
    losses = []
    for windows in batches:
        params, opt_state, loss = step(params, opt_state, rates, windows)
        losses.append(loss)
    return [[float(x) for x in row] for row in jnp.stack(losses).T]  # [rates][steps]


def batch_stream(args, vocab_size: int) -> tuple[list, int]:
    """(--steps windows [batch, seq + 1] from the shards, or random tokens below vocab_size: the same for every run;
    the vocabulary size the models need: the shards' tokenizer's)."""
    import numpy as np

    if args.data is None:
        rng = np.random.default_rng(args.seed)
        return [rng.integers(0, vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
                for _ in range(args.steps)], vocab_size
    from llmjax.data.loader import batch_at
    from llmjax.experiments.train import open_data

    source, _, tokenizer = open_data(args.data)
    batches = [batch_at(source, step, batch_size=args.batch, seq_len=args.seq, seed=args.seed)
               for step in range(args.steps)]
    return batches, tokenizer.vocab_size if tokenizer is not None else int(max(b.max() for b in batches)) + 1


def best_rate(losses: list[float], rates: list[float]) -> float | None:
    finite = [(loss, rate) for loss, rate in zip(losses, rates) if math.isfinite(loss)]
    return min(finite)[1] if finite else None


def summarize(results: dict, args) -> dict:
    """The best rate per width and its move, in grid steps (log2 of the ratio), from the narrowest to the widest."""
    summary = {}
    for kind, by_width in results.items():
        best = {w: best_rate(row["final"], args.lr_list) for w, row in by_width.items()}
        widths = sorted(best, key=int)
        first, last = best[widths[0]], best[widths[-1]]
        shift = abs(math.log2(last / first)) if first and last else None
        summary[kind] = {"best_lr": best, "shift_grid_steps": shift}
    return summary


def final_losses(history: list[list[float]], average: int) -> list[float]:
    out = []
    for row in history:
        tail = row[-average:]
        out.append(sum(tail) / len(tail) if all(math.isfinite(x) for x in row) else math.inf)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(report["results"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for width, row in report["results"][kind].items():
            finite = [(r, loss) for r, loss in zip(report["lrs"], row["final"]) if math.isfinite(loss)]
            if finite:
                ax.plot(*zip(*finite), marker="o", label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak learning rate")
        ax.set_title(f"{kind}: best rate moves {report['summary'][kind]['shift_grid_steps']} grid steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"training loss (last {report['average']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from llmjax.config import ConfigError, get_config

    try:
        preset = get_config(args.model)
    except ConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    batches, vocab_size = batch_stream(args, preset.vocab_size)
    preset = dataclasses.replace(preset, vocab_size=vocab_size)
    results = {}
    for kind in args.kinds:
        results[kind] = {}
        for width in args.width_list:
            cfg = model_at(preset, width, args, kind)
            started = time.perf_counter()
            history = sweep_losses(cfg, args, batches)
            final = final_losses(history, args.average)
            results[kind][str(width)] = {"final": final, "history": history,
                                         "seconds": time.perf_counter() - started}
            shown = ", ".join(f"{loss:.3f}" for loss in final)
            print(f"{kind:>8} width {width:>5}: {shown}  ({time.perf_counter() - started:.1f} s)", flush=True)
    report = {"model": args.model, "device": jax.devices()[0].device_kind, "lrs": args.lr_list,
              "widths": args.width_list, "base_width": args.base_width, "layers": args.layers, "steps": args.steps,
              "batch": args.batch, "seq": args.seq, "average": args.average,
              "data": str(args.data) if args.data else "random tokens", "results": results}
    report["summary"] = summarize(results, args)
    for kind, item in report["summary"].items():
        print(f"{kind}: best rate per width {item['best_lr']}, moves {item['shift_grid_steps']} grid steps")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "sweep.png")
    print(f"wrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
