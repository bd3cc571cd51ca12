"""Benchmark Performer / FAVOR+ attention: approximation error vs random features, speed vs exact attention."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_performer",
        description="Two measurements of llmjax.nn.performer (FAVOR+ linear attention). (a) Approximation: the "
        "relative error ||performer - exact|| / ||exact|| of the attention output against exact softmax attention, "
        "causal and non-causal, for each number of random features M, mean and spread over --seeds feature draws "
        "(float32, random Gaussian q, k, v). (b) Speed: forward and forward+backward time of causal performer "
        "attention against exact attention over sequence lengths: our flash attention "
        "(llmjax.kernels.flash_attention) on a GPU; on a CPU (no kernel there) the XLA reference attention "
        "(attention_reference), and the output says so. Reports the crossover length where the performer becomes "
        "faster. Lengths whose estimated memory exceeds --memory-gb, or that run out of memory, are skipped with a "
        "note. Writes a table to stdout, JSON to --out and a PNG chart beside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024],
                   help="(a) numbers of random features M to measure the error at")
    p.add_argument("--seeds", type=int, default=3, help="(a) feature draws (projection keys) per M")
    p.add_argument("--error-seq", type=int, default=1024, help="(a) sequence length of the error measurement")
    p.add_argument("--error-heads", type=int, default=4, help="(a) heads of the error measurement")
    p.add_argument("--qk-std", type=float, default=0.5,
                   help="(a) standard deviation of the q and k entries (logits q.k/sqrt(d) then have std qk_std^2; "
                   "FAVOR+'s variance grows exponentially with |q|^2 + |k|^2 and falls as 1/M: at 1.0 and head_dim "
                   "128 the relative error stays above 1 up to M 1024)")
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072, 262144],
                   help="(b) sequence lengths to time")
    p.add_argument("--batch", type=int, default=1, help="(b) batch size")
    p.add_argument("--heads", type=int, default=16, help="heads (query and kv; (a) uses --error-heads)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (both measurements)")
    p.add_argument("--performer-features", type=int, default=256, help="(b) random features M of the timed performer")
    p.add_argument("--chunk", type=int, default=128, help="(b) causal prefix-sum chunk of the timed performer")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="(b) input dtype; auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--repeats", type=int, default=5, help="(b) timed repetitions per measurement (median reported)")
    p.add_argument("--no-backward", action="store_true", help="(b) forward only")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="(b) skip a length whose estimated peak memory exceeds this; default: the device's memory "
                   "(GPU) or half of the host's RAM (CPU)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="(b) once one call of an implementation takes longer than this, longer lengths of it are "
                   "skipped with a note")
    p.add_argument("--quick", action="store_true",
                   help="a tiny CPU smoke run: M 16 and 64, 1 seed, error length 64, lengths 128 and 256, 2 heads, "
                   "head_dim 32, 2 repeats")
    p.add_argument("--out", type=Path, default=Path("runs/bench/performer.json"),
                   help="JSON results; a PNG chart beside it (same name, .png)")
    args = p.parse_args(argv)
    if args.quick:
        args.features, args.seeds, args.error_seq, args.error_heads = [16, 64], 1, 64, 2
        args.seqs, args.heads, args.head_dim, args.performer_features = [128, 256], 2, 32, 32
        args.chunk, args.repeats = 32, 2
    for name in ("seeds", "error_seq", "error_heads", "batch", "heads", "head_dim", "performer_features", "chunk",
                 "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    for name in ("features", "seqs"):
        if any(x < 1 for x in getattr(args, name)):
            p.error(f"--{name}: every value must be >= 1, got {getattr(args, name)}")
    if args.qk_std <= 0:
        p.error(f"--qk-std={args.qk_std}: must be > 0")
    if args.memory_gb is not None and args.memory_gb <= 0:
        p.error(f"--memory-gb={args.memory_gb}: must be > 0")
    return args


def gaussian_qkv(key, batch, seq, heads, head_dim, qk_std, dtype):
    """q, k, v [batch, seq, heads, head_dim]: q and k entries N(0, qk_std^2), v entries N(0, 1)."""
    import jax

    kq, kk, kv = jax.random.split(key, 3)
    shape = (batch, seq, heads, head_dim)
    return (qk_std * jax.random.normal(kq, shape, dtype), qk_std * jax.random.normal(kk, shape, dtype),
            jax.random.normal(kv, shape, dtype))


def approximation_errors(args) -> list[dict]:
    """(a): one row per M with the mean and standard deviation over seeds of the relative output error."""
    import jax
    import jax.numpy as jnp

    from llmjax.kernels.flash_attention.reference import attention_reference
    from llmjax.nn.performer import performer_attention, performer_projection

    q, k, v = gaussian_qkv(jax.random.key(1234), 1, args.error_seq, args.error_heads, args.head_dim, args.qk_std,
                           jnp.float32)
    rows = []
    for causal in (False, True):
        exact = attention_reference(q, k, v, causal=causal)
        approx = jax.jit(lambda q, k, v, p, causal=causal: performer_attention(q, k, v, p, causal=causal))
        for m in args.features:
            errors = [float(jnp.linalg.norm(approx(q, k, v, performer_projection(m, args.head_dim,
                                                                                 jax.random.key(seed)))
                                            - exact) / jnp.linalg.norm(exact)) for seed in range(args.seeds)]
            rows.append({"causal": causal, "features": m, "mean": float(np.mean(errors)),
                         "std": float(np.std(errors)), "errors": errors})
    return rows


def error_table(rows: list[dict]) -> str:
    lines = [f"{'M':>6}  {'non-causal':>18}  {'causal':>18}"]
    for m in sorted({r["features"] for r in rows}):
        cells = []
        for causal in (False, True):
            r = next(r for r in rows if r["features"] == m and r["causal"] == causal)
            cells.append(f"{r['mean']:.4f} ± {r['std']:.4f}")
        lines.append(f"{m:>6}  {cells[0]:>18}  {cells[1]:>18}")
    return "\n".join(lines)


def memory_budget_bytes(args, device) -> float:
    if args.memory_gb is not None:
        return args.memory_gb * 2**30
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return 0.9 * stats["bytes_limit"]
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimated_bytes(impl: str, seq: int, args, itemsize: int, backward: bool) -> float:
    """Rough peak memory of one call: inputs and outputs, plus what each implementation keeps per token
    (flash: O(seq)), per chunk (performer: features and, for the backward, the scan's running sums per chunk) or
    per pair of tokens (the XLA reference: float32 scores, probabilities and, backward, their gradients)."""
    b, h, d, m = args.batch, args.heads, args.head_dim, args.performer_features
    io = 4 * b * seq * h * d * itemsize * (2 if backward else 1)  # q, k, v, out (+ their gradients)
    if impl == "performer":
        features = 4 * b * seq * h * m * 4 * (2 if backward else 1)  # phi(q), phi(k) float32 (+ gradients)
        sums = (seq // args.chunk + 1) * b * h * m * (d + 1) * 4 if backward else 0  # scan residuals per chunk
        chunk_scores = 2 * b * h * args.chunk * (args.chunk + m + d) * 4 * 4
        return io + features + sums + chunk_scores
    if impl == "reference":
        return io + b * h * seq * seq * 4 * (4 if backward else 2)
    return io * 2  # flash attention: O(seq) statistics


def attention_functions(args, platform: str) -> dict:
    """{name: causal attention (q, k, v) -> out}: the performer and the exact baseline of this platform."""
    import jax
    import jax.numpy as jnp

    from llmjax.kernels.flash_attention.reference import attention_reference
    from llmjax.nn.performer import performer_attention, performer_projection

    projection = performer_projection(args.performer_features, args.head_dim, jax.random.key(0))
    functions = {"performer": lambda q, k, v: performer_attention(q, k, v, projection, causal=True, chunk=args.chunk)}
    if platform == "gpu":
        from llmjax.kernels.flash_attention import flash_attention

        functions["flash"] = lambda q, k, v: flash_attention(q, k, v, causal=True)
    else:
        functions["reference"] = lambda q, k, v: attention_reference(q, k, v, causal=True)
    timed = {}
    for name, fn in functions.items():
        def loss(q, k, v, fn=fn):
            return jnp.sum(fn(q, k, v).astype(jnp.float32))

        timed[name] = {"forward": jax.jit(fn), "forward_backward": jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}
    return timed


def out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def time_lengths(args, device) -> tuple[list[dict], list[str]]:
    """(b): one row per length {seq, impl: {forward_s, forward_backward_s} or a skip note}; and the notes."""
    import jax
    import jax.numpy as jnp

    from llmjax.experiments.bench_attention import median_seconds

    dtype = {"auto": jnp.bfloat16 if device.platform == "gpu" else jnp.float32, "bfloat16": jnp.bfloat16,
             "float32": jnp.float32}[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    budget = memory_budget_bytes(args, device)
    functions = attention_functions(args, device.platform)
    directions = ["forward"] + ([] if args.no_backward else ["forward_backward"])
    too_slow: dict[str, str] = {}
    rows, notes = [], []
    for seq in args.seqs:
        q, k, v = gaussian_qkv(jax.random.key(seq), args.batch, seq, args.heads, args.head_dim, 1.0, dtype)
        row = {"seq": seq}
        for impl, fns in functions.items():
            result = {}
            for direction in directions:
                need = estimated_bytes(impl, seq, args, itemsize, direction == "forward_backward")
                if impl in too_slow:
                    result[direction + "_skipped"] = too_slow[impl]
                elif need > budget:
                    result[direction + "_skipped"] = f"needs ~{need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
                else:
                    try:
                        seconds = median_seconds(fns[direction], q, k, v, repeats=args.repeats)
                    except Exception as error:  # noqa: BLE001 - only out-of-memory is skipped, the rest re-raised
                        if not out_of_memory(error):
                            raise
                        result[direction + "_skipped"] = "out of memory"
                    else:
                        result[direction + "_s"] = seconds
                        if seconds > args.max_seconds:
                            too_slow[impl] = f"a call took {seconds:.1f} s > --max-seconds at seq {seq}"
                if direction + "_skipped" in result:
                    notes.append(f"{impl} seq {seq} {direction}: skipped ({result[direction + '_skipped']})")
            row[impl] = result
        rows.append(row)
        print(f"seq {seq}: " + ", ".join(f"{impl} " + " / ".join(
            f"{row[impl][d + '_s'] * 1e3:.2f} ms" if d + "_s" in row[impl] else "skipped" for d in directions)
            for impl in functions), flush=True)
    return rows, notes


def crossover(rows: list[dict], baseline: str, direction: str) -> dict:
    """The shortest measured length from which the performer is faster than the baseline at every longer length
    measured by both: {"seq": int or None, "text": a sentence}."""
    key = direction + "_s"
    both = [r for r in rows if key in r["performer"] and key in r[baseline]]
    if not both:
        return {"seq": None, "text": "no length measured by both"}
    faster = [r["performer"][key] < r[baseline][key] for r in both]
    if not faster[-1]:
        return {"seq": None, "text": f"performer slower up to the longest length measured by both ({both[-1]['seq']})"}
    first = len(faster)
    while first > 0 and faster[first - 1]:
        first -= 1
    seq = both[first]["seq"]
    if first == 0:
        return {"seq": seq, "text": f"performer faster already at the shortest length measured ({seq})"}
    return {"seq": seq, "text": f"performer faster from seq {seq} (slower at {both[first - 1]['seq']})"}


def speed_table(rows: list[dict], impls: list[str], directions: list[str]) -> str:
    header = f"{'seq':>8}" + "".join(f"  {impl + ' ' + d.replace('forward_backward', 'fwd+bwd'):>22}"
                                     for d in directions for impl in impls)
    lines = [header]
    for r in rows:
        cells = []
        for d in directions:
            for impl in impls:
                value = r[impl].get(d + "_s")
                cells.append(f"{value * 1e3:>19.2f} ms" if value is not None else f"{'skipped':>22}")
        lines.append(f"{r['seq']:>8}" + "".join(f"  {c}" for c in cells))
    return "\n".join(lines)


def plot(errors: list[dict], rows: list[dict], impls: list[str], directions: list[str], path: Path, title: str):
    """Three panels: relative error vs M (log-log, causal and not); forward time and forward+backward time vs length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    figure, axes = plt.subplots(1, 1 + len(directions), figsize=(5 * (1 + len(directions)), 4))
    for causal in (False, True):
        points = [r for r in errors if r["causal"] == causal]
        axes[0].errorbar([r["features"] for r in points], [r["mean"] for r in points], [r["std"] for r in points],
                         marker="o", capsize=3, label="causal" if causal else "non-causal")
    axes[0].set(xscale="log", yscale="log", xlabel="random features M", ylabel="relative error of the output",
                title="FAVOR+ vs exact attention")
    axes[0].legend()
    for axis, direction in zip(axes[1:], directions):
        for impl in impls:
            points = [(r["seq"], r[impl][direction + "_s"]) for r in rows if direction + "_s" in r[impl]]
            if points:
                axis.plot(*zip(*points), marker="o", label=impl)
        axis.set(yscale="log", xlabel="sequence length", ylabel="seconds",
                 title=f"causal {direction.replace('_', '+')}")
        axis.set_xscale("log", base=2)
        seqs = [r["seq"] for r in rows]
        axis.set_xticks(seqs, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqs])
        axis.xaxis.set_minor_locator(NullLocator())
        axis.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    device = jax.devices()[0]
    baseline = "flash" if device.platform == "gpu" else "reference"
    if baseline == "reference":
        print(f"no GPU ({device.platform}): the exact baseline is the XLA reference attention (attention_reference), "
              f"not our flash attention, which needs a CUDA GPU")

    print(f"\n(a) relative output error vs exact attention: seq {args.error_seq}, {args.error_heads} heads, head_dim "
          f"{args.head_dim}, q/k std {args.qk_std}, mean ± std over {args.seeds} feature draws", flush=True)
    errors = approximation_errors(args)
    print(error_table(errors))

    directions = ["forward"] + ([] if args.no_backward else ["forward_backward"])
    print(f"\n(b) causal time, batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}, performer M "
          f"{args.performer_features} chunk {args.chunk}, on {device.device_kind}", flush=True)
    rows, notes = time_lengths(args, device)
    impls = ["performer", baseline]
    print(speed_table(rows, impls, directions))
    crossovers = {d: crossover(rows, baseline, d) for d in directions}
    for d, c in crossovers.items():
        print(f"crossover ({d.replace('_', '+')}, performer vs {baseline}): {c['text']}")
    for note in notes:
        print("note:", note)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
               "baseline": baseline, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "errors": errors, "timings": rows, "crossover": crossovers, "notes": notes}
    args.out.write_text(json.dumps(summary, indent=2, default=lambda x: None if isinstance(x, float)
                                   and math.isnan(x) else str(x)))
    png = args.out.with_suffix(".png")
    plot(errors, rows, impls, directions, png,
         f"{device.device_kind}: performer (M {args.performer_features}) vs {baseline}, b{args.batch} h{args.heads} "
         f"d{args.head_dim}")
    print(f"\nresults: {args.out} and {png}")
    return 0
