"""Decode speed: latency per token and tokens/s over batch x context, against the bandwidth roofline and HF transformers generate (GPU)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

from llmjax.io.models import GGUF_HELP, QUANTIZED_HELP


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_decode",
        description="Time our decode loop (lax loop of decode_step + greedy choice over a KV cache filled to each "
        "context length, Pallas split-K decode attention) on a random-init LLaMA-style model (--model) or a real "
        "GGUF model (--gguf: its config and weights, bf16, or its quantized blocks with --quantized) at every batch x "
        "context, and compare with the memory-bandwidth roofline (bytes of weights + KV read per step / measured "
        "copy bandwidth) and with Hugging Face transformers generate on the same model and GPU (torch, bf16, SDPA, "
        "run first in the same process; for --gguf transformers loads the same file with its GGUF loader). Writes a "
        "table, JSON and PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default="llama-1b", help="model preset (random init, bf16)")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", default=None,
                        help=GGUF_HELP + "; timed with its weights in bf16 (the roofline counts their bytes)")
    p.add_argument("--quantized", action="store_true",
                   help=QUANTIZED_HELP.replace("float32, the compute dtype", "bf16") + " (matmul: the fused Pallas "
                   "kernel on GPUs, XLA's dequantize-then-dot elsewhere); the HF peer stays bf16")
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--contexts", default="128,1024,2048,8192")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per point (median)")
    p.add_argument("--hf-points", default="1x128,1x2048,32x128,32x2048", help="batch x context points for HF generate")
    p.add_argument("--int8-points", default="64x2048", help="batch x context points also timed with an int8 cache")
    p.add_argument("--bandwidth-mib", type=int, default=2048, help="size of the array the bandwidths are measured on")
    p.add_argument("--decode-impl", default="auto", choices=["auto", "xla", "pallas"])
    p.add_argument("--layout", default="fused", choices=["fused", "separate"],
                   help="the decode weights' layout: q / k / v and gate / up side by side, one matmul each (fused), "
                   "or as trained, one matmul per projection (separate); not with --quantized")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "bench_decode.json")
    return p.parse_args(argv)


def _points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


# --- Hugging Face peer ----------------------------------------------------------------------------

def hf_peer(cfg, points, steps: int, gguf: Path | None = None) -> dict:
    """ms per decode step of transformers' generate (greedy, default dynamic cache, SDPA, bf16) on a random model of
    cfg, or on the GGUF file loaded by transformers' own GGUF loader (it dequantizes the file)."""
    if not points:
        return {"skipped": "no points asked for"}
    try:
        import torch
        import transformers
    except ImportError as error:
        print(f"HF peer skipped: {error}")
        return {"skipped": str(error)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(cfg, gguf, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {"transformers": transformers.__version__, "torch": torch.__version__, "points": {}}

    def timed(batch, context, new_tokens):
        ids = torch.randint(0, cfg.vocab_size, (batch, context), device=device)
        mask = torch.ones_like(ids)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        sync()
        return time.perf_counter() - start

    for batch, context in points:
        try:
            timed(batch, context, 2)  # warm-up
            prefill = min(timed(batch, context, 1) for _ in range(2))
            total = min(timed(batch, context, steps + 1) for _ in range(2))
            ms = (total - prefill) / steps * 1e3
            results["points"][f"{batch}x{context}"] = {"ms_per_step": ms, "tokens_per_s": batch / ms * 1e3}
            print(f"HF generate batch {batch:>3} context {context:>5}: {ms:7.2f} ms/step, {batch / ms * 1e3:9.0f} tok/s",
                  flush=True)
        except torch.cuda.OutOfMemoryError as error:
            results["points"][f"{batch}x{context}"] = {"error": str(error).splitlines()[0]}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def hf_model(cfg, gguf: Path | None, device: str):
    """transformers' LlamaForCausalLM (bf16, SDPA) with random weights of cfg, or the GGUF file through transformers'
    GGUF loader."""
    import torch
    import transformers

    from llmjax.io.hf import hf_config_from

    if gguf is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, attn_implementation="sdpa").to(device).eval()
    hf_config = transformers.LlamaConfig(**{k: v for k, v in hf_config_from(cfg).items()
                                            if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()


# --- ours -----------------------------------------------------------------------------------------

def copy_bandwidth(jax, jnp, mib: int = 2048) -> tuple[float, float]:
    """(copy, read) bytes per second: x + 1 over `mib` MiB (read + write), and a sum over it (read only)."""
    x = jax.random.normal(jax.random.key(0), (mib, 512 * 1024), jnp.bfloat16)
    f = jax.jit(lambda x: x + 1)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - start)
    copy = 2 * x.nbytes / statistics.median(times)
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    jax.block_until_ready(total(x))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(total(x))
        times.append(time.perf_counter() - start)
    read = x.nbytes / statistics.median(times)
    del x
    return copy, read


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch runs in this process too
    from llmjax.config import count_params, get_config

    model = None
    if args.gguf is not None:
        from llmjax.io.models import ModelLoadError, load_model, model_name

        try:  # read before the HF peer: a bad path is one line, at once
            model = load_model(gguf=args.gguf, dtype="bfloat16", quantized=args.quantized)
        except ModelLoadError as error:
            raise SystemExit(f"bench_decode: {error}") from None
        cfg = model.cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
        name = model_name(gguf=args.gguf) + (" (quantized blocks)" if args.quantized else "")
    elif args.quantized:
        raise SystemExit("bench_decode: --quantized keeps a GGUF file's quantized blocks: it needs --gguf")
    else:
        cfg = get_config(args.model, param_dtype="bfloat16", compute_dtype="bfloat16")
        name = args.model
    if args.quantized and args.layout != "fused":
        raise SystemExit("bench_decode: --layout separate is for float weights; --quantized fuses its matrices")
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    results = {"model": name, "params": count_params(cfg, padded_vocab=True), "steps": args.steps,
               "layout": args.layout}
    # first: before JAX holds memory
    results["hf"] = hf_peer(cfg, _points(args.hf_points), args.steps, model.source if model else None)

    import jax
    import jax.numpy as jnp

    from llmjax.infer import kv_cache
    from llmjax.infer.decode_model import (
        decode_step,
        prepare_params,
        resolve_decode_impl,
    )
    from llmjax.model import init_params

    device = jax.devices()[0]
    results["device"] = device.device_kind
    bandwidth, read_bandwidth = copy_bandwidth(jax, jnp, args.bandwidth_mib)
    results["copy_bandwidth_GBps"], results["read_bandwidth_GBps"] = bandwidth / 1e9, read_bandwidth / 1e9
    print(f"device: {device.device_kind}; copy bandwidth {bandwidth / 1e9:.0f} GB/s, read {read_bandwidth / 1e9:.0f} GB/s",
          flush=True)
    memory = device.memory_stats().get("bytes_limit", 0) if device.memory_stats() else 0
    prepare = jax.jit(functools.partial(prepare_params, fuse=args.layout == "fused"), static_argnames="cfg")
    if model is None:
        dparams = prepare(init_params(cfg, jax.random.key(0)), cfg)
    elif args.quantized:
        from llmjax.quant.model import quantized_decode_params

        matmul = "pallas" if device.platform == "gpu" else "xla"
        dparams = quantized_decode_params(jax.device_put(model.params, device), cfg, matmul)
        results["matmul"] = matmul
    else:
        dparams = prepare(jax.device_put(model.params, device), cfg)
    del model
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(dparams))
    if cfg.positions == "learned":
        weight_bytes -= dparams["embed"]["position"].nbytes
    if not cfg.tie_embeddings:
        weight_bytes -= dparams["embed"]["token"].nbytes  # only `batch` rows of the input embedding are read
    results["weight_bytes"] = weight_bytes

    def loop(dparams, cache, tokens, impl, min_rows):
        def body(_, carry):
            cache, tokens = carry
            logits, cache = decode_step(dparams, tokens, cache, cfg, impl, min_rows)
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, args.steps, body, (cache, tokens))

    impl = results["decode_impl"] = resolve_decode_impl(args.decode_impl, cfg)

    def fill(cache, key):
        """Random keys / values in every slot (one random row broadcast: the values do not change the timing)."""
        def layer(entry, key):
            out = {}
            for i, name in enumerate(("k", "v")):
                row = jax.random.normal(jax.random.fold_in(key, i), entry[name].shape[1:], jnp.bfloat16)
                x = jnp.broadcast_to(row, entry[name].shape)
                if "k_scale" in entry:
                    out[name], out[f"{name}_scale"] = kv_cache.quantize(x)
                else:
                    out[name] = x.astype(entry[name].dtype)
            return out

        keys = jax.random.split(key, len(cache["layers"]))
        return {**cache, "layers": tuple(layer(e, k) for e, k in zip(cache["layers"], keys))}

    fill = jax.jit(fill, donate_argnums=0)

    @jax.jit
    def at_context(positions, context):
        """Slots 0..context-1 hold positions 0..context-1; the next token goes to slot `context`."""
        batch, cap = positions.shape
        slots = jnp.arange(cap)[None, :]
        full = jnp.full((batch,), context, jnp.int32)
        return jnp.broadcast_to(jnp.where(slots < context, slots, -1), (batch, cap)).astype(jnp.int32), full, full

    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    margin = args.steps * (args.repeats + 2) + 64

    def slot_bytes(cache_dtype):
        if cache_dtype == "int8":
            return kv_bytes_per_token + 2 * cfg.num_layers * cfg.num_kv_heads * 4  # values + float32 scales
        return 2 * kv_bytes_per_token

    def fits(batch, context, cache_dtype):
        """Room for the cache twice over (XLA may hold a second copy while the loop runs) and the weights."""
        need = 2 * batch * (context + margin) * slot_bytes(cache_dtype) + 3 * weight_bytes
        return not memory or need < 0.92 * memory

    rows = []
    int8_points = set(_points(args.int8_points))
    variants = [("bfloat16", None)] + [("int8", None)] + ([("bfloat16", 1)] if 1 in batches else [])
    for batch in batches:
        for cache_dtype, min_rows in variants:
            if min_rows is not None and batch != 1:
                continue
            wanted = [c for c in contexts if (cache_dtype == "bfloat16" and min_rows is None)
                      or (cache_dtype == "int8" and (batch, c) in int8_points)
                      or (min_rows is not None and c == contexts[0])]
            skipped = [c for c in wanted if not fits(batch, c, cache_dtype)]
            for context in skipped:
                print(f"batch {batch:>3} context {context:>5} {cache_dtype:>8}: skipped (the cache would not fit twice "
                      f"in {memory / 2**30:.0f} GiB)", flush=True)
            wanted = [c for c in wanted if c not in skipped]
            if not wanted:
                continue
            capacity = -(-(max(wanted) + margin) // 512) * 512
            label = cache_dtype if min_rows is None else f"{cache_dtype}, 1-row matmuls"
            run = jax.jit(functools.partial(loop, impl=impl, min_rows=min_rows), donate_argnums=(1,))
            cache = fill(kv_cache.init_cache(cfg, batch, capacity, cache_dtype), jax.random.key(batch))
            tokens = jnp.zeros((batch,), jnp.int32)
            compiled_at = time.perf_counter()
            for context in wanted:
                positions, next_slot, next_position = at_context(cache["positions"], context)
                cache = {**cache, "positions": positions, "next_slot": next_slot, "next_position": next_position}
                try:
                    cache, tokens = run(dparams, cache, tokens)  # warm-up (compiles once per batch and variant)
                    jax.block_until_ready(tokens)
                except Exception as error:  # noqa: BLE001  (say what failed, record the row as failed, go on)
                    message = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    print(f"batch {batch:>3} context {context:>5} {label}: failed ({message})", flush=True)
                    rows.append({"batch": batch, "context": context, "cache": label, "error": message})
                    break
                if context == wanted[0]:
                    print(f"  (batch {batch} {label}: compiled + warm-up {time.perf_counter() - compiled_at:.1f}s)",
                          flush=True)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    cache, tokens = run(dparams, cache, tokens)
                    jax.block_until_ready(tokens)
                    times.append(time.perf_counter() - start)
                ms = statistics.median(times) / args.steps * 1e3
                mid_context = context + args.steps * (args.repeats + 1)  # average cache length over the timed steps
                step_bytes = weight_bytes + batch * mid_context * slot_bytes(cache_dtype)
                roofline_ms = step_bytes / bandwidth * 1e3
                row = {"batch": batch, "context": context, "cache": label, "ms_per_step": ms,
                       "tokens_per_s": batch / ms * 1e3, "roofline_ms": roofline_ms,
                       "fraction_of_roofline": roofline_ms / ms, "read_roofline_ms": step_bytes / read_bandwidth * 1e3,
                       "fraction_of_read_roofline": step_bytes / read_bandwidth * 1e3 / ms, "bytes_per_step": step_bytes}
                hf = results["hf"].get("points", {}).get(f"{batch}x{context}", {}) if label == "bfloat16" else {}
                if "ms_per_step" in hf:
                    row["hf_ms_per_step"] = hf["ms_per_step"]
                    row["speedup_vs_hf"] = hf["ms_per_step"] / ms
                rows.append(row)
                print(f"batch {batch:>3} context {context:>5} {label:>8}: {ms:7.3f} ms/step  "
                      f"{row['tokens_per_s']:9.0f} tok/s  {100 * row['fraction_of_roofline']:5.1f}% of copy roofline  "
                      f"{100 * row['fraction_of_read_roofline']:5.1f}% of read roofline"
                      + (f"  {row['speedup_vs_hf']:.1f}x HF" if "speedup_vs_hf" in row else ""), flush=True)
            del cache
    results["rows"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"wrote {args.out} and {plot(results, args.out.with_suffix('.png'))}")
    return 0


def print_table(results: dict) -> None:
    print(f"\n{results['model']} ({results['params'] / 1e9:.2f}B params, bf16), {results['device']}, "
          f"decode attention {results.get('decode_impl')}, {results.get('layout', 'fused')} projections, "
          f"copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s, read {results['read_bandwidth_GBps']:.0f} GB/s, "
          f"{results['steps']} steps per timed call")
    print("| batch | context | cache | ms / token | tokens/s | roofline ms (copy) | % of roofline (copy / read) "
          "| HF ms / token | vs HF |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['batch']} | {r['context']} | {r['cache']} | failed: {r['error']} | | | | | |")
            continue
        hf = f"{r['hf_ms_per_step']:.2f} | {r['speedup_vs_hf']:.1f}x" if "hf_ms_per_step" in r else "- | -"
        print(f"| {r['batch']} | {r['context']} | {r['cache']} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['roofline_ms']:.3f} | {100 * r['fraction_of_roofline']:.0f}% / "
              f"{100 * r['fraction_of_read_roofline']:.0f}% | {hf} |")


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in results["rows"] if r["cache"] == "bfloat16" and "error" not in r]
    for context in sorted({r["context"] for r in rows}):
        points = sorted((r["batch"], r["tokens_per_s"], r["batch"] / r["roofline_ms"] * 1e3) for r in rows
                        if r["context"] == context)
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"ours, context {context}")
        ax.plot([p[0] for p in points], [p[2] for p in points], ":", color=line.get_color())
    hf = results.get("hf", {}).get("points", {})
    for key, value in hf.items():
        if "tokens_per_s" in value:
            batch, context = map(int, key.split("x"))
            ax.plot(batch, value["tokens_per_s"], "kx")
            ax.annotate(f"HF {context}", (batch, value["tokens_per_s"]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{results['model']} decode on {results['device']} (dotted: bandwidth roofline)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
