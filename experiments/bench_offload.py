"""Offloaded generation tokens/s: FlexGen-style zig-zag vs layer-by-layer offload, HF device_map="auto", all on device.

    python -m experiments bench_offload --model llama-8b --compute-dtype bfloat16 --gpu-memory 8GiB --batch 32 \\
        --prompt-len 512 --gen-lens 32,128 --profile runs/offload/trace
    python -m experiments bench_offload --quick     # llama-tiny on the CPU

For each output length (prompt --prompt-len, FlexGen's tables use 512 / 32), generated tokens/s of
- ours: the cost model's placement under --gpu-memory, the zig-zag schedule at --batch;
- layer_by_layer_batch1 / layer_by_layer: every layer's weights in pinned host memory, loaded, computed, evicted
  with no overlap (what accelerate-style offload does), at batch 1 and at --batch;
- all_on_device: llmjax.infer.generate with every weight on the device (the ceiling), where the device holds them;
- hf_device_map_auto: transformers' generate with device_map="auto" and max_memory = --gpu-memory (torch + CUDA +
  accelerate only; skipped with a note otherwise).
Host->device bandwidth is measured in the same run: the PCIe-bound ceiling of a placement is its bytes moved per
generated token over that bandwidth. Prints a table, writes JSON and a PNG.
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
    p.add_argument("--methods", default="ours,layer_by_layer_batch1,layer_by_layer,all_on_device,hf_device_map_auto",
                   help="comma-separated subset of the methods above")
    p.add_argument("--profile", type=Path, default=None, help="a jax.profiler trace of ours' measured run (overlap)")
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
    weight = sizes["layer_int8"] if placement.host_int8 else sizes["layer"]
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


def run_methods(args, prepared, cfg, hardware: dict, choice, budget: int, scratch: Path) -> list[dict]:
    from llmjax.infer import offload

    host = offload.Placement.uniform(cfg.num_layers, "host", "device")
    ours = offload.place_model(None, cfg, choice.placement, disk_dir=args.disk or scratch / "ours", prepared=prepared)
    baseline = ours if choice.placement == host else offload.place_model(None, cfg, host, prepared=prepared)
    rows = []
    for gen_len in args.gen_lens:
        prompts = random_prompts(cfg, args.batch, args.prompt_len, args.seed)
        h2d = hardware["bandwidths"]["h2d"]
        for method in args.methods:
            row = {"method": method, "gen_len": gen_len, "batch": 1 if method.endswith("batch1") else args.batch}
            placement = choice.placement if method == "ours" else host
            try:
                if method == "ours":
                    profile = args.profile if gen_len == args.gen_lens[0] else None
                    row.update(timed_generation(ours, prompts, gen_len, "zigzag", profile, cache_dtype(args)))
                elif method.startswith("layer_by_layer"):
                    row.update(timed_generation(baseline, prompts[: row["batch"]], gen_len, "layer_by_layer"))
                elif method == "all_on_device":
                    capacity = device_capacity_bytes()
                    everything = offload.predict(cfg, offload.Placement.uniform(cfg.num_layers), args.batch,
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
            if method != "hf_device_map_auto":
                moved = moved_bytes_per_step(cfg, placement, row["batch"], args.prompt_len, gen_len,
                                             cache_dtype(args) if method == "ours" else None)
                row["bytes_moved_per_step"] = moved
                row["pcie_ceiling_tokens_per_s"] = row["batch"] * h2d / moved if moved else None
                if moved:
                    row["fraction_of_pcie_ceiling"] = row["tokens_per_s"] / row["pcie_ceiling_tokens_per_s"]
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'method':<24}{'gen':>6}{'batch':>7}{'tokens/s':>12}{'PCIe ceiling':>14}{'of ceiling':>12}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['method']:<24}{row['gen_len']:>6}{row['batch']:>7}  skipped: {row['skipped']}")
            continue
        ceiling = row.get("pcie_ceiling_tokens_per_s")
        fraction = row.get("fraction_of_pcie_ceiling")
        print(f"{row['method']:<24}{row['gen_len']:>6}{row['batch']:>7}{row['tokens_per_s']:>12.2f}"
              f"{(f'{ceiling:.2f}' if ceiling else '-'):>14}{(f'{fraction:.1%}' if fraction else '-'):>12}")


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
        hardware = measure_hardware(args, cfg.compute_dtype)
        choice, budget = resolve_placement(args, cfg, hardware)
        print(f"ours: {choice.describe()}")
        print(f"host->device {hardware['bandwidths']['h2d'] / 1e9:.2f} GB/s, device->host "
              f"{hardware['bandwidths']['d2h'] / 1e9:.2f} GB/s, {hardware['flops'] / 1e12:.2f} TFLOP/s")
        with tempfile.TemporaryDirectory(prefix="bench-offload-") as scratch:
            rows = run_methods(args, prepared, cfg, hardware, choice, budget, Path(scratch))
    except offload.OffloadError as error:
        raise SystemExit(f"error: {error}") from None
    print_table(rows)
    device = jax.devices()[0].device_kind
    result = {"model": args.model or str(args.ckpt or args.gguf or args.hf), "device": device,
              "batch": args.batch, "prompt_len": args.prompt_len, "gpu_memory_bytes": budget,
              "placement": choice.placement.describe(), "predicted_tokens_per_s": choice.predicted_tokens_per_s,
              **hardware, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(rows, args.gen_lens, png, f"{result['model']} on {device}, budget {offload.format_bytes(budget)}, "
                                   f"prompt {args.prompt_len}")
    print(f"wrote {args.out} and {png}")
    return result


if __name__ == "__main__":
    main()
