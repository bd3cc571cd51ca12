"""Activation memory of each gradient-checkpointing policy, for full fine-tuning, LoRA and QLoRA (compiled, nothing run)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
MODES = ("full", "lora", "qlora")


def memory_row(memory) -> dict:
    """XLA's memory analysis of a compiled step (`compiled.memory_analysis()`) in bytes, with the device peak it
    implies: "peak_estimate" = arguments + outputs + temporaries - aliased (donated). Host temporaries (offloaded
    residuals) live in host memory and are reported apart."""
    row = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
           "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes,
           "host_temporaries": getattr(memory, "host_temp_size_in_bytes", 0) or 0}
    row["peak_estimate"] = row["arguments"] + row["outputs"] + row["temporaries"] - row["aliased"]
    return row


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments remat_memory",
        description="Compile one training step per (mode, remat policy) from abstract shapes (no weights are "
        "allocated, so a 1B model fits on a laptop) and report XLA's memory_analysis(): arguments (weights, "
        "optimizer state, batch), temporaries (the saved activations and workspace), host temporaries (offload). "
        "Modes: full fine-tuning (float32 master weights + AdamW), LoRA (frozen base in the compute dtype), "
        "QLoRA (frozen NF4 block kernels, the rest in the compute dtype). CPU compiles ignore host offload "
        "(offload reads like dots_no_batch there); run it on a GPU for the offload column.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="gpt2-mini", help="model preset (llama-1b for the QLoRA-vs-full comparison)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a ModelConfig field")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--policies", default=",".join(POLICIES), help="remat policies, comma-separated")
    p.add_argument("--modes", default=",".join(MODES), help="full, lora, qlora, comma-separated")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--measure-steps", type=int, default=0,
                   help="also run this many real steps per (mode, policy), each in its own process, and report the "
                        "device's peak bytes in use (jax memory_stats). Full fine-tuning starts from a random init; "
                        "the frozen LoRA / QLoRA bases are zeros of the right shapes and dtypes (memory does not "
                        "depend on the values), so no float copy of the base is ever made")
    p.add_argument("--jobs", type=int, default=1,
                   help="with --measure-steps: processes at once (they share the GPU; memory is counted per process, "
                        "and GPU preallocation is turned off in them)")
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)  # one (mode, policy), JSON here
    p.add_argument("--out", type=Path, default=None, help="JSON of the table (default: runs/remat_memory/MODEL.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from llmjax.experiments.train import parse_overrides
    from llmjax.config import ConfigError, TrainConfig, get_config
    from llmjax.model import init_params
    from llmjax.peft.lora import LoraConfig
    from llmjax.peft.train import init_lora_state, lora_train_step
    from llmjax.quant.model import quantize_params
    from llmjax.train.step import init_train_state, train_step

    try:
        cfg = get_config(args.model, **parse_overrides(args.set))
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    policies, modes = args.policies.split(","), args.modes.split(",")
    for name, chosen, allowed in (("policy", policies, POLICIES), ("mode", modes, MODES)):
        unknown = [c for c in chosen if c not in allowed]
        if unknown:
            raise SystemExit(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    train_cfg, lora_cfg = TrainConfig(), LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    batch = {k: jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32) for k in ("inputs", "targets")}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    float_params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    bases = {
        "lora": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.compute_dtype)), float_params),
        # NF4 block kernels; embeddings, norms and biases in the compute dtype, as for LoRA
        "qlora": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.compute_dtype))
                              if jnp.issubdtype(s.dtype, jnp.floating) and s.dtype.itemsize > 2 else s,
                              jax.eval_shape(lambda p: quantize_params(p, cfg, "nf4", 64), float_params)),
    }
    device = jax.devices()[0]
    print(f"{cfg.name}: batch {args.batch} x {args.seq} tokens, compiled for {device.platform} ({device.device_kind})",
          flush=True)

    def compiled(mode: str, policy: str):
        model_cfg = cfg.replace(remat=policy)
        if mode == "full":
            state = jax.eval_shape(lambda: init_train_state(model_cfg, train_cfg, jax.random.key(0)))
            step = functools.partial(train_step, model_cfg=model_cfg, train_cfg=train_cfg)
            return jax.jit(step, donate_argnums=0).lower(state, batch).compile()
        base = bases[mode]
        state = jax.eval_shape(lambda p: init_lora_state(p, cfg, lora_cfg, train_cfg, jax.random.key(0)), base)
        step = functools.partial(lora_train_step, cfg=model_cfg, lora_cfg=lora_cfg, train_cfg=train_cfg, remat=policy)
        return jax.jit(step, donate_argnums=0).lower(state, base, batch, rng).compile()

    def concrete_state_and_base(mode: str, model_cfg):
        """Real arrays for --measure-steps: a random init for full fine-tuning, zeros for a frozen base."""
        if mode == "full":
            return jax.jit(lambda key: init_train_state(model_cfg, train_cfg, key))(jax.random.key(0)), None
        base = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), bases[mode])
        return jax.jit(lambda p, key: init_lora_state(p, cfg, lora_cfg, train_cfg, key))(base, jax.random.key(0)), base

    def measure(mode: str, policy: str, step) -> dict:
        """Run --measure-steps steps of the compiled step; the device's peak bytes in use and the step time."""
        model_cfg = cfg.replace(remat=policy)
        state, base = concrete_state_and_base(mode, model_cfg)
        tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, cfg.vocab_size, jnp.int32)
        concrete = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        run = (lambda state: step(state, concrete)) if mode == "full" else (
            lambda state: step(state, base, concrete, jax.random.key(2)))
        times = []
        for _ in range(args.measure_steps):
            started = time.perf_counter()
            state, metrics = run(state)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
        stats = device.memory_stats() or {}
        return {"measured_peak": stats.get("peak_bytes_in_use"), "measured_in_use": stats.get("bytes_in_use"),
                "step_ms": 1e3 * min(times) if times else None}

    def analyze(mode: str, policy: str) -> dict:
        started = time.perf_counter()
        try:
            step = compiled(mode, policy)
            memory = step.memory_analysis()
        except Exception as error:  # noqa: BLE001  (a policy this backend cannot compile is reported, not fatal)
            row = {"mode": mode, "remat": policy, "error": f"{type(error).__name__}: {str(error)[:200]}"}
            print(f"  {mode:>5} {policy:>13}: cannot compile here ({row['error']})", flush=True)
            return row
        row = {"mode": mode, "remat": policy, **memory_row(memory), "compile_s": time.perf_counter() - started}
        if args.measure_steps:
            row.update(measure(mode, policy, step))
        measured = f", measured peak {row['measured_peak'] / 2**20:,.1f} MiB" if row.get("measured_peak") else ""
        print(f"  {mode:>5} {policy:>13}: arguments {row['arguments'] / 2**20:9.1f} MiB, temporaries "
              f"{row['temporaries'] / 2**20:9.1f} MiB, host {row['host_temporaries'] / 2**20:.1f} MiB{measured} "
              f"({row['compile_s']:.0f} s to compile)", flush=True)
        return row

    if args.child_out is not None:
        args.child_out.write_text(json.dumps(analyze(modes[0], policies[0])))
        return 0
    configs = [(mode, policy) for mode in modes for policy in policies]
    rows = in_children(args, argv, configs) if args.measure_steps else [analyze(*c) for c in configs]

    mib = lambda b: f"{b / 2**20:,.1f}" if b is not None else "-"  # noqa: E731
    measured = args.measure_steps > 0
    lines = ["| mode | remat | weights + optimizer + batch (MiB) | activations + workspace (MiB) | host (MiB) | "
             "arguments + temporaries + outputs - donated (MiB) |" + (" measured peak (MiB) | step ms |" if measured
                                                                       else ""),
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if measured else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['remat']} | - | - | - | cannot compile here |" + (" - | - |" if measured
                                                                                               else ""))
        else:
            extra = ""
            if measured:
                extra = f" {mib(r.get('measured_peak'))} | " + (f"{r['step_ms']:.0f} |" if r.get("step_ms") else "- |")
            lines.append(f"| {r['mode']} | {r['remat']} | {mib(r['arguments'])} | {mib(r['temporaries'])} | "
                         f"{mib(r['host_temporaries'])} | {mib(r['peak_estimate'])} |" + extra)
    table = "\n".join(lines)
    print(table)
    out = args.out or Path("runs/remat_memory") / f"{cfg.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": cfg.name, "batch": args.batch, "seq": args.seq, "lora_rank": args.rank,
                               "measure_steps": args.measure_steps,
                               "device": f"{device.platform} ({device.device_kind})", "rows": rows, "table": table,
                               "command": "python -m experiments remat_memory " + " ".join(
                                   argv if argv is not None else sys.argv[2:])}, indent=2))
    print(f"wrote {out}")
    return 0


def in_children(args, argv, configs) -> list[dict]:
    """One process per (mode, policy), --jobs at a time, so each measured peak is that configuration's alone."""
    import os
    import subprocess
    import tempfile

    argv = list(argv if argv is not None else sys.argv[1:])
    drop = {"--modes", "--policies", "--jobs", "--out"}
    kept = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in drop:
            skip = "=" not in item
            continue
        kept.append(item)
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    rows, running = {}, []
    with tempfile.TemporaryDirectory() as folder:
        pending = list(enumerate(configs))
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                index, (mode, policy) = pending.pop(0)
                out = Path(folder) / f"{index}.json"
                command = [sys.executable, "-m", "llmjax.experiments", "remat_memory", *kept, "--modes", mode, "--policies",
                           policy, "--child-out", str(out)]
                running.append((index, mode, policy, out, subprocess.Popen(command, env=env)))
            index, mode, policy, out, process = running.pop(0)
            process.wait()
            rows[index] = (json.loads(out.read_text()) if out.is_file() else
                           {"mode": mode, "remat": policy, "error": f"the measuring process exited with {process.returncode}"})
    return [rows[i] for i in range(len(configs))]


if __name__ == "__main__":
    sys.exit(main())
