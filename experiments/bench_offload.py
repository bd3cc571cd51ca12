"""Offloaded generation tokens/s: FlexGen-style zig-zag vs layer-by-layer offload, HF device_map="auto", all on device.

    python -m experiments bench_offload --model llama-8b --compute-dtype bfloat16 --gpu-memory 8GiB --batch auto \\
        --host-quant int4 --cache-int8 --prompt-len 512 --gen-lens 32,128 --profile runs/offload/trace
    python -m experiments bench_offload --quick     # llama-tiny on the CPU

For each output length (prompt --prompt-len, FlexGen's tables use 512 / 32), generated tokens/s of
- ours: the cost model's placement under --gpu-memory, the zig-zag schedule at --batch (auto: the cost model's
  batch too);
- layer_by_layer_batch1 / layer_by_layer: every layer's weights in pinned host memory (in the compute dtype),
  loaded, computed, evicted with no overlap (what accelerate-style offload does), at batch 1 and at
  --baseline-batch (default: the largest batch whose cache and activations fit --gpu-memory beside one layer, where
  this PCIe-bound schedule runs fastest: its best batch);
- all_on_device: llmjax.infer.generate with every weight on the device (the ceiling) at ours' batch, where the
  device holds them;
- hf_device_map_auto: transformers' generate with device_map="auto" and max_memory = --gpu-memory at the baseline's
  batch (torch + CUDA + accelerate only; skipped with a note otherwise).
Host->device bandwidth is measured in the same run: the PCIe-bound ceiling of a placement is its bytes moved per
generated token over that bandwidth. Each row also records the device memory in use at its peak (sampled every
millisecond during the timed run; the baseline's without ours' resident layers). Prints a table with ours' speed-up
over the layer-by-layer baseline, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from llmjax.experiments.generate_offload import (add_offload_flags, apply_quick, cache_dtype, load, measure_hardware,
                                                 random_prompts, timed_generation)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments bench_offload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_offload_flags(p)
    p.add_argument("--gen-lens", default="32,128", help="comma-separated output lengths (--gen-len is ignored)")
    p.add_argument("--baseline-batch", default="max",
                   help="the layer-by-layer baseline's batch: a number, or max (the largest that fits --gpu-memory)")
    p.add_argument("--methods", default="ours,layer_by_layer_batch1,layer_by_layer,all_on_device,hf_device_map_auto",
                   help="comma-separated subset of the methods above")
    p.add_argument("--profile", type=Path, default=None,
                   help="write a jax.profiler trace of one more run of ours (8 tokens, after the timed ones) here; "
                        "tools/offload_overlap.py turns it into the copy / compute overlap and a timeline PNG")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/offload")) / "bench_offload.json",
                   help="the JSON; the PNG goes beside it")
    args = p.parse_args(argv)
    try:
        args.gen_lens = [int(x) for x in args.gen_lens.split(",") if x]
    except ValueError:
        p.error(f"--gen-lens {args.gen_lens!r}: expected comma-separated integers such as 32,128")
    if args.quick:
        args.gen_lens = [2, 4][: len(args.gen_lens)]
    if not args.gen_lens or min(args.gen_lens) < 1:
        p.error("--gen-lens: give at least one length >= 1")
    args.gen_len = max(args.gen_lens)
    apply_quick(args)
    if args.baseline_batch != "max" and not args.baseline_batch.isdigit():
        p.error(f"--baseline-batch {args.baseline_batch!r}: expected a number or max")
    args.methods = [m for m in args.methods.split(",") if m]
    for name in args.methods:
        if name not in METHODS:
            p.error(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
    return args


METHODS = ("ours", "layer_by_layer_batch1", "layer_by_layer", "all_on_device", "hf_device_map_auto")


def moved_bytes_per_step(cfg, placement, batch: int, prompt_len: int, gen_len: int, cache_dtype=None) -> int:
    """Bytes a decode step copies host -> device under `placement`: offloaded weights (int8 or not) and caches."""
    from llmjax.infer import offload

    sizes = offload.model_sizes(cfg, batch, prompt_len, gen_len, cache_dtype)
    weight = sizes[f"layer_{placement.host_format}"] if placement.host_format else sizes["layer"]
    return (sum(weight for w in placement.weights if w != "device")
            + sum(sizes["cache_layer"] for c in placement.cache if c != "device"))


def device_capacity_bytes() -> int | None:
    """The device's memory limit as the runtime reports it (None where it does not, e.g. CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def time_all_on_device(model, prompts, gen_len: int) -> dict:
    """llmjax.infer.generate (the ordinary on-device path) with every layer fetched to the device; twice, the
    second timed."""
    from llmjax.infer import offload
    from llmjax.infer.generate import generate

    prepared = {**model.head, "layers": [offload.fetch_layer(model, i) for i in range(model.cfg.num_layers)]}
    generate(None, model.cfg, prompts, max_new_tokens=gen_len, prepared=prepared)
    start = time.perf_counter()
    generate(None, model.cfg, prompts, max_new_tokens=gen_len, prepared=prepared)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": len(prompts) * gen_len / seconds}


def time_hf_device_map_auto(cfg, prompts, gen_len: int, budget: int) -> dict:
    """transformers' generate on a random-weight copy of the config, device_map="auto" under max_memory; raises
    RuntimeError with the reason where it cannot run."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise RuntimeError(f"transformers / torch not importable ({error})") from None
    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device here")
    from llmjax.io.hf import hf_config_from

    config = transformers.AutoConfig.for_model(**hf_config_from(cfg))
    dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
    with tempfile.TemporaryDirectory(prefix="hf-offload-") as folder:
        transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype).save_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, torch_dtype=dtype, device_map="auto", max_memory={0: budget, "cpu": 10**13})
        ids = torch.tensor(prompts, device="cuda")
        options = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False)
        model.generate(ids, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **options)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": len(prompts) * gen_len / seconds}


def baseline_batch(args, cfg, budget: int) -> int:
    """--baseline-batch, or the largest batch the layer-by-layer placement fits in the budget."""
    from llmjax.infer import offload

    if args.baseline_batch != "max":
        return int(args.baseline_batch)
    host = offload.Placement.uniform(cfg.num_layers, "host", "device")
    batch = offload.largest_batch(cfg, lambda b: host, args.prompt_len, max(args.gen_lens), budget)
    if batch < 1:
        raise offload.OffloadError(f"--gpu-memory {offload.format_bytes(budget)} does not hold the layer-by-layer "
                                   f"baseline at batch 1: raise --gpu-memory or give --baseline-batch")
    return batch


def resident_layer_bytes(model) -> int:
    """Bytes of the model's layers placed on the device."""
    import jax

    return sum(leaf.nbytes for layer, where in zip(model.layers, model.placement.weights) if where == "device"
               for leaf in jax.tree.leaves(layer))


def run_methods(args, prepared, cfg, hardware: dict, choice, budget: int, scratch: Path) -> list[dict]:
    from llmjax.infer import offload

    host = offload.Placement.uniform(cfg.num_layers, "host", "device")
    ours = offload.place_model(None, cfg, choice.placement, disk_dir=args.disk or scratch / "ours", prepared=prepared)
    baseline = ours
    if choice.placement != host:  # every layer in pinned host memory; the head (on the device) shared with ours
        baseline = offload.OffloadedModel(cfg, host, ours.head, offload.place_on(prepared["layers"], "host"))
    # bytes of ours' resident layers, on the device while the baseline runs too: not the baseline's own memory
    idle = {"layer_by_layer": resident_layer_bytes(ours), "layer_by_layer_batch1": resident_layer_bytes(ours)}
    batches = {"ours": args.batch, "layer_by_layer_batch1": 1, "layer_by_layer": args.baseline_batch,
               "all_on_device": args.batch, "hf_device_map_auto": args.baseline_batch}
    rows = []
    for gen_len in args.gen_lens:
        all_prompts = random_prompts(cfg, max(batches.values()), args.prompt_len, args.seed)
        h2d = hardware["bandwidths"]["h2d"]
        for method in args.methods:
            row = {"method": method, "gen_len": gen_len, "batch": batches[method]}
            prompts = all_prompts[: row["batch"]]
            placement = choice.placement if method == "ours" else host
            try:
                if method == "ours":
                    row.update(timed_generation(ours, prompts, gen_len, "zigzag", None, cache_dtype(args)))
                    if args.profile is not None and gen_len == args.gen_lens[-1]:  # untimed: tracing slows it
                        timed_generation(ours, prompts, min(gen_len, 8), "zigzag", args.profile, cache_dtype(args))
                elif method.startswith("layer_by_layer"):
                    row.update(timed_generation(baseline, prompts, gen_len, "layer_by_layer"))
                elif method == "all_on_device":
                    capacity = device_capacity_bytes()
                    everything = offload.predict(cfg, offload.Placement.uniform(cfg.num_layers), row["batch"],
                                                 args.prompt_len, gen_len).device_bytes
                    if capacity is not None and everything > 0.9 * capacity:
                        raise RuntimeError(f"needs {offload.format_bytes(everything)}, the device has "
                                           f"{offload.format_bytes(capacity)}")
                    row.update(time_all_on_device(baseline, prompts, gen_len))  # float weights
                    placement = offload.Placement.uniform(cfg.num_layers)
                else:
                    row.update(time_hf_device_map_auto(cfg, prompts, gen_len, budget))
            except RuntimeError as error:
                row["skipped"] = str(error)
                rows.append(row)
                continue
            row.pop("tokens", None)
            if row.get("peak_device_bytes"):
                row["peak_device_bytes"] -= idle.get(method, 0)
            if method != "hf_device_map_auto":
                moved = moved_bytes_per_step(cfg, placement, row["batch"], args.prompt_len, gen_len,
                                             cache_dtype(args) if method == "ours" else None)
                row["bytes_moved_per_step"] = moved
                row["pcie_ceiling_tokens_per_s"] = row["batch"] * h2d / moved if moved else None
                if moved:
                    row["fraction_of_pcie_ceiling"] = row["tokens_per_s"] / row["pcie_ceiling_tokens_per_s"]
            rows.append(row)
    return rows


def speedups(rows: list[dict]) -> dict:
    """Per output length: ours' tokens/s over the layer-by-layer baseline's (at its batch), where both ran."""
    speed = {(r["method"], r["gen_len"]): r.get("tokens_per_s") for r in rows}
    return {gen_len: speed[("ours", gen_len)] / speed[("layer_by_layer", gen_len)]
            for gen_len in sorted({r["gen_len"] for r in rows})
            if speed.get(("ours", gen_len)) and speed.get(("layer_by_layer", gen_len))}


def print_table(rows: list[dict]) -> None:
    from llmjax.infer.offload import format_bytes

    print(f"{'method':<24}{'gen':>6}{'batch':>7}{'tokens/s':>12}{'PCIe ceiling':>14}{'of ceiling':>12}"
          f"{'device peak':>14}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['method']:<24}{row['gen_len']:>6}{row['batch']:>7}  skipped: {row['skipped']}")
            continue
        ceiling = row.get("pcie_ceiling_tokens_per_s")
        fraction = row.get("fraction_of_pcie_ceiling")
        peak = row.get("peak_device_bytes")
        print(f"{row['method']:<24}{row['gen_len']:>6}{row['batch']:>7}{row['tokens_per_s']:>12.2f}"
              f"{(f'{ceiling:.2f}' if ceiling else '-'):>14}{(f'{fraction:.1%}' if fraction else '-'):>12}"
              f"{(format_bytes(peak) if peak else '-'):>14}")
    for gen_len, ratio in speedups(rows).items():
        print(f"output {gen_len}: ours / layer by layer = {ratio:.2f}x")


def plot(rows: list[dict], gen_lens: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        values = [next((r.get("tokens_per_s", 0.0) for r in rows if r["method"] == method and r["gen_len"] == g), 0.0)
                  for g in gen_lens]
        ax.bar(np.arange(len(gen_lens)) + index * width, values, width, label=method)
    ax.set_xticks(np.arange(len(gen_lens)) + width * (len(methods) - 1) / 2, [f"output {g}" for g in gen_lens])
    ax.set_ylabel("generated tokens / s")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    run(parse_args(argv))


def run(args) -> dict:
    import jax

    from llmjax.infer import offload

    from llmjax.experiments.generate_offload import resolve_placement

    args.placement, args.micro_batches = "auto", None
    try:
        prepared, cfg = load(args)
        hardware = measure_hardware(args, cfg, prepared)
        choice, budget = resolve_placement(args, cfg, hardware)
        args.baseline_batch = baseline_batch(args, cfg, budget)
        print(f"ours: {choice.describe()}")
        print(f"layer by layer: batch {args.baseline_batch}")
        print(f"host->device {hardware['bandwidths']['h2d'] / 1e9:.2f} GB/s, device->host "
              f"{hardware['bandwidths']['d2h'] / 1e9:.2f} GB/s, {hardware['flops'] / 1e12:.2f} TFLOP/s, "
              f"{hardware['launch_seconds'] * 1e6:.0f} us a layer call")
        with tempfile.TemporaryDirectory(prefix="bench-offload-") as scratch:
            rows = run_methods(args, prepared, cfg, hardware, choice, budget, Path(scratch))
    except offload.OffloadError as error:
        raise SystemExit(f"error: {error}") from None
    print_table(rows)
    device = jax.devices()[0].device_kind
    result = {"model": args.model or str(args.ckpt or args.gguf or args.hf), "device": device,
              "batch": args.batch, "baseline_batch": args.baseline_batch, "prompt_len": args.prompt_len,
              "gpu_memory_bytes": budget, "cache_dtype": cache_dtype(args) or cfg.compute_dtype,
              "placement": choice.placement.describe(), "predicted_tokens_per_s": choice.predicted_tokens_per_s,
              "predicted_device_bytes": choice.device_bytes,
              "speedup_over_layer_by_layer": {str(k): v for k, v in speedups(rows).items()}, **hardware, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(rows, args.gen_lens, png, f"{result['model']} on {device}, budget {offload.format_bytes(budget)}, "
                                   f"prompt {args.prompt_len}")
    print(f"wrote {args.out} and {png}")
    return result


if __name__ == "__main__":
    main()
