"""Offloaded generation (FlexGen-style) under a device-memory budget: the placement, predicted vs measured tokens/s.

    python -m experiments generate_offload --model llama-8b --gpu-memory 8GiB --batch 32 --prompt-len 512 --gen-len 32
    python -m experiments generate_offload --model llama-8b --gpu-memory 8GiB --batch auto --host-quant int4 \\
        --cache-int8                             # the cost model also picks the batch and the host weights' format
    python -m experiments generate_offload --quick        # llama-tiny on the CPU, a smoke test

Prints the placement (chosen by llmjax.infer.offload.choose_placement from bandwidths and FLOP/s measured in the
same run, or given by --placement), the cost model's predicted tokens/s and the measured ones (the second of two
runs: the first compiles), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

PLACEMENTS = {
    # name: (weights, cache)
    "device": ("device", "device"),
    "host": ("host", "device"),
    "host-cache": ("host", "host"),
    "disk": ("disk", "device"),
    "disk-cache": ("disk", "host"),
}


def add_offload_flags(p: argparse.ArgumentParser) -> None:
    """The model and offload flags generate_offload and bench_offload share."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a model preset with random weights (e.g. llama-8b, llama-tiny)")
    source.add_argument("--ckpt", type=Path, help="a run folder (train / quickstart): its newest checkpoint")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", help="a GGUF file or a packaged model's name")
    source.add_argument("--hf", metavar="FOLDER", help="a Hugging Face folder (config.json + safetensors)")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default=None,
                   help="the model's compute dtype (default: its own)")
    p.add_argument("--gpu-memory", default="20GiB",
                   help="the device-memory budget for weights, caches and activations (e.g. 8GiB, 512MiB)")
    p.add_argument("--batch", type=batch_flag, default=8,
                   help="prompts generated together, or auto: the batch (up to 512) the cost model predicts the most "
                        "tokens/s for within --gpu-memory (placement auto)")
    p.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt (random ids, seeded)")
    p.add_argument("--gen-len", type=int, default=32, help="tokens generated per prompt (greedy, no early stop)")
    p.add_argument("--host-quant", choices=HOST_FORMATS, default=None,
                   help="weights kept on the host / disk as int8 (half of bf16's bytes to move) or int4 in groups of "
                        "128 (a quarter), dequantized on the device after the copy: logits change slightly; with "
                        "--placement auto, the cost model may use it or the compute dtype")
    p.add_argument("--cache-int8", action="store_true",
                   help="the KV cache as int8 with per-token scales (half of bf16's bytes on the device and to move; "
                        "logits change slightly)")
    p.add_argument("--disk", type=Path, default=None,
                   help="folder for the per-layer safetensors files of disk placements (default: a temporary one)")
    p.add_argument("--host-memory", default=None,
                   help="host-memory budget for offloaded weights (e.g. 64GiB); the rest go to --disk (auto only)")
    p.add_argument("--bandwidth-mib", type=int, default=256, help="size of the arrays bandwidths are measured on")
    p.add_argument("--seed", type=int, default=0, help="random prompt ids and preset weights")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: llama-tiny (unless a model is given), batch 4, prompt 16, 4 tokens, small "
                        "bandwidth arrays")


HOST_FORMATS = ("int8", "int4")  # llmjax.infer.offload.HOST_FORMATS (not imported: --help stays fast)


def batch_flag(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of prompts or auto") from None


def apply_quick(args) -> None:
    if args.quick:
        if not (args.model or args.ckpt or args.gguf or args.hf):
            args.model = "llama-tiny"
        args.batch = args.batch if args.batch == "auto" else min(args.batch, 4)
        args.prompt_len, args.gen_len = min(args.prompt_len, 16), min(args.gen_len, 4)
        args.bandwidth_mib = min(args.bandwidth_mib, 8)
    elif not (args.model or args.ckpt or args.gguf or args.hf):
        raise SystemExit("error: give the model: --model PRESET, --ckpt RUN, --gguf NAME or --hf FOLDER (or --quick)")
    for name in ("batch", "prompt_len", "gen_len", "bandwidth_mib"):
        if getattr(args, name) != "auto" and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments generate_offload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_offload_flags(p)
    p.add_argument("--placement", default="auto", choices=("auto", *PLACEMENTS),
                   help="auto: the cost model's choice under --gpu-memory; device: everything on the device; host: "
                        "weights in pinned host memory; host-cache: weights and KV cache there; disk / disk-cache: "
                        "weights in memory-mapped files under --disk")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per layer (FlexGen's column); default: the cost model's choice (auto) or 1")
    p.add_argument("--schedule", choices=("zigzag", "layer_by_layer"), default="zigzag",
                   help="zigzag: each layer loaded once for all micro-batches, the next one's copy overlapping; "
                        "layer_by_layer: load, compute, evict with no overlap (the accelerate-style baseline)")
    p.add_argument("--profile", type=Path, default=None, help="write a jax.profiler trace of the measured run here")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/offload")) / "generate_offload.json",
                   help="where the JSON goes")
    args = p.parse_args(argv)
    apply_quick(args)
    if args.batch == "auto" and (args.placement != "auto" or args.micro_batches is not None):
        p.error("--batch auto goes with --placement auto and no --micro-batches (the cost model picks all three)")
    if args.micro_batches is not None and (args.micro_batches < 1 or args.batch % args.micro_batches):
        p.error(f"--micro-batches {args.micro_batches}: must be >= 1 and divide --batch {args.batch}")
    return args


def load(args):
    """(decode-ready weights in host memory as NumPy arrays, cfg) of the model the flags name: the device keeps
    only what a placement puts there."""
    import jax

    from llmjax.infer.generate import _prepare_jit
    from llmjax.io.models import load_model

    loaded = load_model(ckpt=args.ckpt, hf=args.hf, gguf=args.gguf, preset=args.model, seed=args.seed,
                        compute_dtype=args.compute_dtype)
    params, cfg = loaded.params, loaded.cfg
    del loaded
    prepared = jax.device_get(_prepare_jit(params, cfg))
    del params
    return prepared, cfg


def random_prompts(cfg, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, size=(batch, prompt_len)).tolist()


def measure_hardware(args, cfg, prepared: dict) -> dict:
    """Bandwidths, FLOP/s and one layer call's fixed cost, measured here (the cost model's inputs)."""
    from llmjax.infer import offload

    bandwidths = offload.measure_bandwidths(args.bandwidth_mib)
    flops = offload.measure_flops(256 if args.quick else 4096, cfg.compute_dtype)
    launch = offload.measure_launch_seconds(prepared["layers"][0], cfg, bandwidths)
    return {"bandwidths": bandwidths, "flops": flops, "launch_seconds": launch}


def cache_dtype(args) -> str | None:
    return "int8" if args.cache_int8 else None


def resolve_placement(args, cfg, hardware: dict):
    """(PlacementChoice, budget bytes) from --placement / --micro-batches / --gpu-memory; one OffloadError when the
    named placement does not fit the budget."""
    from llmjax.infer import offload

    budget = offload.parse_bytes(args.gpu_memory)
    measured = dict(bandwidths=hardware["bandwidths"], flops=hardware["flops"])
    options = dict(cache_dtype=cache_dtype(args), launch_seconds=hardware["launch_seconds"])
    if args.placement == "auto":
        host = offload.parse_bytes(args.host_memory) if args.host_memory else None
        search = dict(host_bytes=host, host_formats=(None, args.host_quant) if args.host_quant else (None,), **options)
        if args.batch == "auto":
            choice = offload.choose_batch(cfg, args.prompt_len, args.gen_len, budget, **measured, **search)
            args.batch = choice.batch
        else:
            choice = offload.choose_placement(cfg, args.batch, args.prompt_len, args.gen_len, budget, **measured,
                                              **search)
        if args.micro_batches is not None:
            placement = offload.Placement(choice.placement.weights, choice.placement.cache, args.micro_batches,
                                          choice.placement.host_format)
            choice = offload.predict(cfg, placement, args.batch, args.prompt_len, args.gen_len, **measured, **options)
    else:
        weights, cache = PLACEMENTS[args.placement]
        placement = offload.Placement.uniform(cfg.num_layers, weights, cache, args.micro_batches or 1,
                                              args.host_quant if weights != "device" else None)
        choice = offload.predict(cfg, placement, args.batch, args.prompt_len, args.gen_len, **measured, **options)
    if choice.device_bytes > budget:
        raise offload.OffloadError(
            f"--placement {args.placement} needs about {offload.format_bytes(choice.device_bytes)} of device memory, "
            f"over --gpu-memory {offload.format_bytes(budget)}: use --placement auto, more micro-batches, or a "
            f"larger --gpu-memory")
    return choice, budget


@contextlib.contextmanager
def sampled_peak_bytes(interval: float = 1e-3):
    """Yields a dict whose "peak" becomes the largest device memory in use sampled every `interval` seconds on a
    thread while the block runs (the runtime's own peak counts everything since the process started, the model's
    loading included); None where the device reports no memory stats (CPU)."""
    import threading

    import jax

    device = jax.devices()[0]
    result = {"peak": None}
    if not (device.memory_stats() or {}).get("bytes_in_use"):
        yield result
        return
    done = threading.Event()

    def sample():
        while not done.is_set():
            in_use = device.memory_stats()["bytes_in_use"]
            result["peak"] = max(result["peak"] or 0, in_use)
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()


def timed_generation(model, prompts, gen_len: int, schedule: str, profile: Path | None = None,
                     cache_dtype: str | None = None) -> dict:
    """A 2-token run with the same cache capacity (it compiles every program), then the timed run: tokens/s over
    prefill + decode."""
    import jax

    from llmjax.infer import offload

    from llmjax.infer import kv_cache

    seq = -(-max(map(len, prompts)) // 8) * 8  # generate.pad_prompts' padded length
    capacity = kv_cache.cache_capacity(model.cfg, seq + gen_len, multiple=64)
    offload.offloaded_generate(model, prompts, min(gen_len, 2), schedule=schedule, capacity=capacity,
                               cache_dtype=cache_dtype)  # compiles
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(profile))
    with sampled_peak_bytes() as peak:
        start = time.perf_counter()
        out = offload.offloaded_generate(model, prompts, gen_len, schedule=schedule, capacity=capacity,
                                         cache_dtype=cache_dtype)
        seconds = time.perf_counter() - start
    if profile is not None:
        jax.profiler.stop_trace()
    return {"seconds": seconds, "tokens_per_s": len(prompts) * gen_len / seconds, "peak_device_bytes": peak["peak"],
            "prefill_seconds": out.prefill_seconds, "decode_seconds": out.decode_seconds, "tokens": out.tokens}


def main(argv=None) -> None:
    run(parse_args(argv))


def run(args) -> dict:
    """The run the parsed flags describe; the JSON's contents."""
    import jax

    from llmjax.infer import offload

    try:
        prepared, cfg = load(args)
        hardware = measure_hardware(args, cfg, prepared)
        choice, budget = resolve_placement(args, cfg, hardware)
        print(f"batch {args.batch}; placement: {choice.placement.describe()}")
        print(f"predicted: {choice.predicted_tokens_per_s:.2f} tokens/s, device memory "
              f"{offload.format_bytes(choice.device_bytes)} of {offload.format_bytes(budget)}")
        with tempfile.TemporaryDirectory(prefix="offload-") as scratch:
            disk = args.disk or Path(scratch)
            model = offload.place_model(None, cfg, choice.placement, disk_dir=disk, prepared=prepared)
            del prepared
            prompts = random_prompts(cfg, args.batch, args.prompt_len, args.seed)
            measured = timed_generation(model, prompts, args.gen_len, args.schedule, args.profile, cache_dtype(args))
    except offload.OffloadError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"measured: {measured['tokens_per_s']:.2f} tokens/s ({args.batch} x {args.gen_len} tokens in "
          f"{measured['seconds']:.3f} s; prefill {measured['prefill_seconds']:.3f} s) "
          f"on {jax.devices()[0].device_kind}"
          + (f"; peak device memory {offload.format_bytes(measured['peak_device_bytes'])}"
             if measured["peak_device_bytes"] else ""))
    result = {
        "model": args.model or str(args.ckpt or args.gguf or args.hf), "device": jax.devices()[0].device_kind,
        "batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "schedule": args.schedule,
        "cache_dtype": cache_dtype(args) or cfg.compute_dtype,
        "gpu_memory_bytes": budget, "placement": choice.placement.describe(),
        "micro_batches": choice.placement.micro_batches, "predicted_tokens_per_s": choice.predicted_tokens_per_s,
        "predicted_device_bytes": choice.device_bytes, "peak_device_bytes": measured["peak_device_bytes"],
        "measured_tokens_per_s": measured["tokens_per_s"],
        "measured_seconds": measured["seconds"], "prefill_seconds": measured["prefill_seconds"], **hardware,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
