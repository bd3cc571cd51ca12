"""Training-step speed: our jitted step against a torch.compile nanoGPT-style peer, same shapes, one process.

Prints tokens/s, ms/step, MFU and peak memory for both and the ratio, and checks that our fast
configuration's loss follows the plain one (XLA attention, norms and loss, no remat) over the first
steps. The torch peer (experiments/_torch_gpt.py: bf16 autocast, torch.compile, fused AdamW, SDPA) exists for GPT-2
presets; it runs first, frees its memory, then JAX starts.

    python -m experiments bench_train --model gpt2-124m --batch 16 --seq 1024
    python -m experiments bench_train --model llama-1b --batch 8 --seq 2048 --set remat=dots
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


PRECISIONS = {  # --precision name -> the ModelConfig fields it sets
    "bf16": {"matmul_precision": "bf16"},
    "fp8": {"matmul_precision": "fp8", "fp8_scaling": "current"},
    "fp8-delayed": {"matmul_precision": "fp8", "fp8_scaling": "delayed"},
}


def parse_precisions(text: str) -> tuple[str, ...]:
    """'bf16,fp8' -> ("bf16", "fp8"); 'both' and 'all' as the help says."""
    names = {"both": "bf16,fp8", "all": ",".join(PRECISIONS)}.get(text, text).split(",")
    unknown = [name for name in names if name not in PRECISIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown precision {unknown[0] if unknown else text!r}; choose from "
                                         f"{', '.join(PRECISIONS)}, both, all (comma-separated)")
    return tuple(dict.fromkeys(names))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments bench_train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2-124m", help="model preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field of our side, e.g. --set remat=dots --set attention_impl=pallas")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary size for both sides (nanoGPT's padded 50304)")
    p.add_argument("--loss-impl", choices=("auto", "forward_grad", "pallas", "xla"), default="auto",
                   help="training loss (TrainConfig.loss_impl): forward_grad (gradient computed with the loss, "
                        "bf16 logits), pallas (fused linear + cross-entropy), xla (float32 chunks), or auto")
    p.add_argument("--precision", type=parse_precisions, default=("bf16",),
                   help="our blocks' matmuls, one or several comma-separated, timed one after the other in this run: "
                        "bf16 (the compute dtype), fp8 (ModelConfig.matmul_precision: e4m3 operands, e5m2 "
                        "gradients, per-tensor current scales), fp8-delayed (the same with delayed scaling: scales "
                        "from a 16-step amax history); 'both' = bf16,fp8, 'all' = every one. MFU always counts "
                        "against the bf16 peak, and the peer stays bf16")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--check-steps", type=int, default=10,
                   help="steps over which our configuration's loss is compared with the plain one; 0 skips")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--profile", type=Path, default=None, help="save a jax.profiler trace of 3 of our steps here")
    p.add_argument("--out", type=Path, default=Path("runs/bench_train"), help="folder for results.json")
    return p.parse_args(argv)


def batches(vocab: int, batch: int, seq: int, count: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32) for _ in range(count)]


def run_torch(cfg, args) -> dict:
    """The peer's tokens/s, or {"skipped": reason}."""
    if cfg.positions != "learned" or cfg.norm != "layernorm":
        return {"skipped": "the torch peer is nanoGPT's GPT-2; this preset is not one"}
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    from llmjax.experiments._torch_gpt import from_config, make_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = from_config(cfg).to(device)
    step = make_step(model, compile_model=device == "cuda")
    data = [torch.from_numpy(w).long().to(device) for w in batches(cfg.vocab_size, args.batch, args.seq, 2)]
    for i in range(args.warmup):
        step(data[i % 2][:, :-1], data[i % 2][:, 1:]).item()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(data[i % 2][:, :-1], data[i % 2][:, 1:])
    loss = loss.item()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    del model, step, data
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": seconds, "peak_bytes": peak, "loss": loss, "device": device}


def run_ours(cfg, args):
    import jax

    from llmjax.config import TrainConfig
    from llmjax.train.step import init_train_state, make_train_step, windows_to_batch

    train_cfg = TrainConfig(warmup_steps=0, total_steps=1000, loss_impl=args.loss_impl)
    state = init_train_state(cfg, train_cfg, jax.random.key(0))
    step = make_train_step(cfg, train_cfg)
    data = [jax.device_put(windows_to_batch(w)) for w in batches(cfg.vocab_size, args.batch, args.seq, 2)]
    for i in range(args.warmup):
        state, metrics = step(state, data[i % 2])
    float(metrics["loss"])
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, data[i % 2])
    loss = float(metrics["loss"])
    seconds = (time.perf_counter() - start) / args.steps
    if args.profile:
        with jax.profiler.trace(str(args.profile)):
            for i in range(3):
                state, metrics = step(state, data[i % 2])
            float(metrics["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    return {"seconds": seconds, "peak_bytes": stats.get("peak_bytes_in_use"), "loss": loss,
            "device": jax.devices()[0].device_kind}


def loss_agreement(cfg, args) -> dict:
    """Max |loss difference| between our configuration and the plain one (XLA attention, norms and loss, no
    remat) over the first steps."""
    import jax

    from llmjax.config import TrainConfig
    from llmjax.train.step import init_train_state, make_train_step, windows_to_batch

    train_cfg = TrainConfig(warmup_steps=0, total_steps=1000, loss_impl=args.loss_impl)
    plain = cfg.replace(attention_impl="xla", norm_impl="xla", remat="none")
    curves = {}
    plain_train_cfg = dataclasses.replace(train_cfg, loss_impl="xla")
    for name, model_cfg, step_cfg in (("ours", cfg, train_cfg), ("plain", plain, plain_train_cfg)):
        state = init_train_state(model_cfg, step_cfg, jax.random.key(0))
        step = make_train_step(model_cfg, step_cfg)
        losses = []
        for window in batches(cfg.vocab_size, args.batch, args.seq, args.check_steps, seed=1):
            state, metrics = step(state, windows_to_batch(window))
            losses.append(float(metrics["loss"]))
        curves[name] = losses
        del state
    difference = max(abs(a - b) for a, b in zip(curves["ours"], curves["plain"]))
    return {"losses": curves, "max_abs_difference": difference}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmjax.experiments.train import parse_overrides
    from llmjax.config import get_config
    from llmjax.train.metrics import flops_per_token

    cfg = get_config(args.model, vocab_size=args.vocab, max_seq_len=max(args.seq, get_config(args.model).max_seq_len),
                     **parse_overrides(args.set))
    torch_result = {"skipped": "--no-torch"} if args.no_torch else run_torch(cfg, args)  # before JAX takes the GPU
    precisions = args.precision
    ours_by_precision = {precision: run_ours(dataclasses.replace(cfg, **PRECISIONS[precision]), args)
                         for precision in precisions}
    ours = ours_by_precision[precisions[0]]
    tokens = args.batch * args.seq
    flops = flops_per_token(cfg, args.seq)
    from llmjax.train.loop import PEAK_FLOPS

    peak = next((f for name, f in PEAK_FLOPS.items() if name in ours["device"]), None)
    rows = {("llmjax (JAX)" if precision == "bf16" else f"llmjax (JAX) {precision}"): row
            for precision, row in ours_by_precision.items()}
    if "skipped" not in torch_result:
        rows["PyTorch nanoGPT peer"] = torch_result
    print(f"{cfg.name}, vocab {cfg.vocab_size}, batch {args.batch} x {args.seq}, {ours['device']} (MFU against the "
          "bf16 peak)")
    print(f"{'':>22} {'tokens/s':>10} {'ms/step':>8} {'MFU':>6} {'peak GiB':>9} {'loss':>7}")
    for name, row in rows.items():
        row["tokens_per_second"] = tokens / row["seconds"]
        row["mfu"] = row["tokens_per_second"] * flops / peak if peak else None
        mfu = f"{row['mfu']:6.1%}" if row["mfu"] is not None else f"{'-':>6}"
        memory = f"{row['peak_bytes'] / 2**30:9.1f}" if row["peak_bytes"] else f"{'-':>9}"
        print(f"{name:>22} {row['tokens_per_second']:10,.0f} {1e3 * row['seconds']:8.1f} {mfu} {memory} {row['loss']:7.3f}")
    result = {"model": cfg.name, "batch": args.batch, "seq": args.seq, "rows": rows, "torch": torch_result}
    if "skipped" in torch_result:
        print(f"torch peer skipped: {torch_result['skipped']}")
    else:
        result["speedup"] = ours["tokens_per_second"] / torch_result["tokens_per_second"]
        print(f"ours / peer: {result['speedup']:.2f}x tokens/s")
    for precision in (p for p in precisions if p != "bf16" and "bf16" in precisions):
        ratio = ours_by_precision[precision]["tokens_per_second"] / ours_by_precision["bf16"]["tokens_per_second"]
        result[f"{precision}_vs_bf16"] = ratio
        print(f"{precision} / bf16: {ratio:.2f}x tokens/s")
    if args.check_steps:
        result["loss_check"] = loss_agreement(cfg, args)
        print(f"loss of this configuration vs plain (XLA attention, norms and loss, no remat) over "
              f"{args.check_steps} steps: "
              f"max |difference| {result['loss_check']['max_abs_difference']:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}/results.json" + (f"; trace in {args.profile}" if args.profile else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
