"""CPU batch-1 chat: prefill and decode tokens/s of a GGUF model, float32 and quantized, vs transformers, llama.cpp."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    # name: (how the weights are loaded, quantized_decode_params' matmul, its head)
    "float32": ("float32", None, None),
    "quantized": ("quantized", "auto", "int8"),  # on CPUs the int8 custom call where it compiles (kernels.cpu_qmatvec)
    "quantized-matvec-xla": ("quantized", "matvec", "int8"),  # the same in XLA: quantized_matvec (before the kernel)
    "quantized-float-head": ("quantized", "auto", "float"),
    "quantized-xla": ("quantized", "xla", "float"),
}
PRECISIONS = {
    # name: (the GGUF type our exporter writes, None for the --gguf file as stored; our variants on that file, None
    # for --variants)
    "file": (None, None),
    # int8 blocks of 32 on both sides: the ">= 0.7x llama.cpp" pairing (with the XLA form, before / after)
    "q8_0": ("q8_0", ("quantized", "quantized-matvec-xla")),
    "f16": ("f16", ("float32",)),  # the same float16 weights on both sides: the greedy-equality check
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
        "quantized (the file's Q4_1 / Q8_0 block linears kept as int4 / int8 QuantizedMatrix, x @ W for int8 by the "
        "CPU int8 custom call kernels.cpu_qmatvec where it compiles (activations quantized to int8 blocks of 32, as "
        "llama.cpp), else and for int4 by the few-row XLA form kernels.matmul_quant.quantized_matvec, the tied "
        "output head re-quantized to int8 groups of 32, exact for a Q8_0 embedding), quantized-matvec-xla (the same "
        "with quantized_matvec for every matrix), quantized-float-head (the head in float32), quantized-xla (XLA's "
        "dequantize-then-dot reference, float32 head). Each variant's bytes of weights read per token over the "
        "measured read bandwidth is its floor. Precisions (one GGUF file each, llama.cpp run on every one): file "
        "(the --gguf file as stored, our --variants on it), q8_0 (the model written by our exporter as q8_0: our "
        "quantized and quantized-matvec-xla variants, int8 blocks, vs llama.cpp's q8_0) and f16 (our exporter's f16 "
        "file: our float32 "
        "variant on its float16 weights vs llama.cpp, whose KV cache is then float32: the greedy-equality check). "
        "Models: the --gguf file, --model PRESET (random weights, the --gguf file's tokenizer and chat prompt) or "
        "--ckpt RUN (a train / quickstart run folder; its chat template, else the prompt as plain text). Peers in "
        "the same run and threads: transformers generate (its GGUF loader, float32) on the file, or on the f16 "
        "export without one, and llama-cpp-python (the bench extra) on every precision's file, when importable; "
        "greedy tokens compared and tokens/s ratios (ours / llama.cpp, ours / transformers) in the table and JSON. "
        "Before / after: copy this file into an older tree's experiments/ and run it there (variants float32 and "
        "quantized-xla, --precisions file).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--gguf", metavar="PATH_OR_NAME", default="smollm2-135m-instruct",
                   help="a GGUF file, or a packaged model's name (./install.sh models); with --model, the source of "
                   "the tokenizer and chat template")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PRESET", default=None,
                        help="a preset with random weights (e.g. llama-1b) instead of the --gguf file's model, with "
                        "the --gguf file's tokenizer; exported to GGUF by our exporter")
    source.add_argument("--ckpt", type=Path, metavar="RUN", default=None,
                        help="a run folder written by `python -m experiments train` / `quickstart` instead of the "
                        "--gguf file's model: its newest checkpoint and tokenizer, exported to GGUF by our exporter")
    p.add_argument("--seed", type=int, default=0, help="--model's random weights")
    p.add_argument("--precisions", default=None,
                   help=f"comma-separated, of {', '.join(PRECISIONS)}; default: all for a --gguf file, q8_0,f16 for "
                   "--model / --ckpt (which have no file of their own)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message, formatted by the model's chat template")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (EOS does not stop a run)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"ours on the 'file' precision, comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}; 'none' for none")
    p.add_argument("--llama-cpp-repack", choices=("auto", "on", "off"), default="auto",
                   help="let llama.cpp repack weights into its extra CPU buffer types (interleaved Q4 / Q8 blocks, "
                   "AMX tiles); auto: on unless the CPU lists AMX (ggml's AMX repacking dies with SIGILL in "
                   "containers that do not grant AMX)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="where the exported GGUF files are written and kept; default: a temporary folder, removed")
    p.add_argument("--bandwidth-mib", type=int, default=512, help="size of the array the read bandwidth is measured on")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "bench_cpu_decode.json",
                   help="where the JSON goes")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.peers = [] if args.peers == "none" else [v for v in args.peers.split(",") if v]
    own_file = args.model is None and args.ckpt is None
    default_precisions = ",".join(PRECISIONS) if own_file else "q8_0,f16"
    args.precisions = [v for v in (args.precisions or default_precisions).split(",") if v]
    for name in args.variants:
        if name not in VARIANTS:
            p.error(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    for name in args.peers:
        if name not in PEERS:
            p.error(f"--peers: unknown peer {name!r}; choose from {', '.join(PEERS)} or 'none'")
    for name in args.precisions:
        if name not in PRECISIONS:
            p.error(f"--precisions: unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if "file" in args.precisions and not own_file:
        p.error("--precisions: 'file' is the --gguf file's own model; with --model / --ckpt choose from q8_0, f16")
    if not args.precisions:
        p.error("--precisions: give at least one")
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 and --repeats >= 1")
    if args.ckpt is not None and not (args.ckpt / "checkpoints").is_dir():
        p.error(f"--ckpt {args.ckpt}: no checkpoints folder; give a run folder written by train / quickstart")
    if args.export_dir is not None and not args.export_dir.is_dir():
        p.error(f"--export-dir {args.export_dir}: no such folder; create it first")
    return args


def thread_count() -> int:
    """The cores this process may run on: XLA's, transformers' and llama.cpp's thread count in this run."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpuinfo_field(field: str) -> str | None:
    """The first `field : value` of /proc/cpuinfo (Linux), None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or "unknown"


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
    torch.set_num_threads(thread_count())
    start = time.perf_counter()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    except Exception as error:  # an architecture or tensor type its GGUF loader does not know
        return {"skipped": f"transformers cannot load {path.name}: {str(error).splitlines()[0][:200]}"}
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
            "dtype": "float32", "file": path.name, "load_s": load_s, "prefill_ms": prefill_s * 1e3,
            "generate_ms": generate_s * 1e3,
            "decode_ms_per_token": decode_s / args.new_tokens * 1e3, "decode_tokens_per_s": args.new_tokens / decode_s,
            "overall_tokens_per_s": args.new_tokens / generate_s, "tokens": out[0, len(ids):].tolist()}


def llama_cpp_repack(choice: str) -> bool:
    """--llama-cpp-repack: whether llama.cpp may move weights into its extra CPU buffer types (repacked Q4 / Q8
    blocks, AMX tiles). auto: yes unless /proc/cpuinfo lists AMX, whose repacking dies with SIGILL in containers
    that do not grant it."""
    if choice != "auto":
        return choice == "on"
    return "amx" not in (cpuinfo_field("flags") or "")


@contextlib.contextmanager
def llama_cpp_model_params(repack: bool):
    """Within: llama-cpp-python's model defaults with use_extra_bufts = repack (Llama() takes no such argument)."""
    import llama_cpp.llama_cpp as low_level

    defaults = low_level.llama_model_default_params

    def with_repack():
        params = defaults()
        params.use_extra_bufts = repack
        return params

    low_level.llama_model_default_params = with_repack
    try:
        yield
    finally:
        low_level.llama_model_default_params = defaults


def open_llama_cpp(path: Path, context: int, *, repack: bool, float32_cache: bool = False):
    """A llama_cpp.Llama on the file with this run's threads; float32_cache: K and V in float32 (ours are), not
    llama.cpp's default float16."""
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if float32_cache else {}
    with llama_cpp_model_params(repack):
        return llama_cpp.Llama(model_path=str(path), n_threads=thread_count(), n_threads_batch=thread_count(),
                               n_ctx=context, n_batch=max(512, context), verbose=False, **cache)


def llama_cpp_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens after the prompt: the argmax of the last position's logits, read from the context (ties to the
    lowest id, as jnp.argmax; no sampler, and no logits kept for the prompt's other positions)."""
    import llama_cpp
    import numpy as np

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab(),))
        return int(np.argmax(logits))

    model.reset()
    model.eval(ids)
    out = [next_token()]
    while len(out) < new_tokens:  # as ours: the prefill's token, then one step per further token
        model.eval(out[-1:])
        out.append(next_token())
    return out


def time_llama_cpp(path: Path, ids: list[int], args, *, float32_cache: bool = False) -> dict:
    try:
        import llama_cpp
    except ImportError as error:
        return {"skipped": f"llama-cpp-python is not importable ({error}); install the bench extra to compare"}
    repack = llama_cpp_repack(args.llama_cpp_repack)
    start = time.perf_counter()
    model = open_llama_cpp(path, len(ids) + args.new_tokens + 1, repack=repack, float32_cache=float32_cache)
    load_s = time.perf_counter() - start

    def prefill():
        model.reset()
        model.eval(ids)

    out = llama_cpp_greedy(model, ids, args.new_tokens)  # warm-up
    generate_s = median_time(lambda: llama_cpp_greedy(model, ids, args.new_tokens), args.repeats)
    prefill_s = median_time(prefill, args.repeats)
    decode_s = max(generate_s - prefill_s, 1e-9)
    model.close()
    return {"llama_cpp": llama_cpp.__version__, "threads": thread_count(), "file": path.name,
            "weights": "as stored in the file", "repack": repack, "kv_cache": "float32" if float32_cache else "float16",
            "load_s": load_s, "prefill_ms": prefill_s * 1e3, "generate_ms": generate_s * 1e3,
            "decode_ms_per_token": decode_s / args.new_tokens * 1e3, "decode_tokens_per_s": args.new_tokens / decode_s,
            "overall_tokens_per_s": args.new_tokens / generate_s, "tokens": out}


# --- the model and its GGUF files -------------------------------------------------------------------

def source_model(args, gguf_path: Path):
    """The LoadedModel the exports are written from: the --gguf file's (float32), --model's or --ckpt's."""
    from llmjax.io.models import load_model

    if args.ckpt is not None:
        return load_model(ckpt=args.ckpt)
    if args.model is None:
        return load_model(gguf=gguf_path)
    import dataclasses

    from llmjax.io.gguf import read_metadata
    from llmjax.io.models import gguf_end_ids
    from llmjax.tokenizer.chat import ChatFormat

    model, metadata = load_model(preset=args.model, tokenizer=str(gguf_path), seed=args.seed), read_metadata(gguf_path)
    return dataclasses.replace(model, chat_format=ChatFormat.from_gguf(metadata),
                               end_ids=gguf_end_ids(metadata, model.tokenizer))


def prompt_ids(model, args) -> tuple[list[int], str]:
    """(the prompt's ids, "chat" or "plain"): the user message in the model's chat template, or as plain text when
    it has none (a quickstart run)."""
    if model.chat_format.template is None:
        return model.tokenizer.encode_prompt(args.prompt), "plain"
    return model.tokenizer.encode_prompt(model.chat_format.render([{"role": "user", "content": args.prompt}])), "chat"


def export_precisions(model, precisions: list[str], folder: Path, name: str) -> dict[str, Path]:
    """{precision: the GGUF file our exporter wrote for it} for the precisions that are exports."""
    from llmjax.io.gguf_export import save_gguf

    paths = {}
    for precision in precisions:
        quant, _ = PRECISIONS[precision]
        if quant is None:
            continue
        paths[precision] = folder / f"{name}-{quant}.gguf"
        save_gguf(model.params, model.cfg, paths[precision], tokenizer=model.tokenizer, quant=quant, name=name,
                  chat_template=model.chat_format.template, eos_id=model.end_ids[0] if model.end_ids else None)
    return paths


# --- report ---------------------------------------------------------------------------------------

def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_with_peers(results: dict) -> None:
    """Adds to each of our rows ("PRECISION/VARIANT") its tokens/s ratios to the llama.cpp row of the same precision
    and to transformers, and whether the greedy tokens are the same (and where they first differ)."""
    for key, ours in results.items():
        precision, _, name = key.partition("/")
        if name in ("", "llama-cpp") or "tokens" not in ours:
            continue
        for label, peer_key in (("llama_cpp", f"{precision}/llama-cpp"), ("transformers", "transformers")):
            peer = results.get(peer_key, {})
            if "tokens" not in peer:
                continue
            ours[f"vs_{label}"] = {
                "peer": peer_key, "decode_ratio": ours["decode_tokens_per_s"] / peer["decode_tokens_per_s"],
                "overall_ratio": ours["overall_tokens_per_s"] / peer["overall_tokens_per_s"],
                "same_tokens": ours["tokens"] == peer["tokens"],
                "first_difference": first_difference(ours["tokens"], peer["tokens"])}


def ratio_cell(r: dict, label: str) -> str:
    """ "0.62x =" (decode ratio; '=' same greedy tokens, '@12' the first differing one), or blank."""
    versus = r.get(f"vs_{label}")
    if versus is None:
        return f"{'':>12}"
    same = "=" if versus["same_tokens"] else f"@{versus['first_difference']}"
    return f"{versus['decode_ratio']:7.2f}x {same:>3}"


def print_table(results: dict, bandwidth: float) -> None:
    print(f"\n{'':28} {'MB/token':>9} {'floor ms':>9} {'prefill ms':>11} {'decode ms':>10} {'decode tok/s':>13} "
          f"{'overall tok/s':>14} {'compile s':>10} {'/llama.cpp':>12} {'/transformers':>13}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:28} skipped: {r['skipped']}")
            continue
        weights = r.get("weight_bytes_per_token")
        mb = f"{weights / 1e6:9.1f}" if weights else f"{'':>9}"
        floor = f"{weights / bandwidth / 1e6:9.2f}" if weights else f"{'':>9}"
        compile_s = f"{r['compile_s']:10.1f}" if "compile_s" in r else f"{'':>10}"
        print(f"{name:28} {mb} {floor} {r['prefill_ms']:11.1f} {r['decode_ms_per_token']:10.2f} "
              f"{r['decode_tokens_per_s']:13.1f} {r['overall_tokens_per_s']:14.1f} {compile_s} "
              f"{ratio_cell(r, 'llama_cpp')} {ratio_cell(r, 'transformers'):>13}")
    print("ratios: ours / peer decode tokens/s; '=' the same greedy tokens, '@N' the first position that differs")


def run_precision(precision: str, path: Path, ids: list[int], args, tokenizer) -> dict:
    """Our variants and llama.cpp on one precision's GGUF file: {"PRECISION/NAME": result}."""
    results = {}
    _, variants = PRECISIONS[precision]
    for name in args.variants if variants is None else variants:
        key = f"{precision}/{name}"
        results[key] = r = time_llmjax(name, path, ids, args)
        print(f"{key}: prefill {r['prefill_ms']:.0f} ms, decode {r['decode_tokens_per_s']:.1f} tok/s, overall "
              f"{r['overall_tokens_per_s']:.1f} tok/s (compile {r['compile_s']:.1f} s): "
              f"{tokenizer.decode(r['tokens'])[:60]!r}", flush=True)
    if "llama-cpp" in args.peers:
        key = f"{precision}/llama-cpp"
        results[key] = r = time_llama_cpp(path, ids, args, float32_cache=precision == "f16")
        print(f"{key}: {r.get('skipped') or 'decode %.1f tok/s' % r['decode_tokens_per_s']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from llmjax.io.gguf import GGUFError, resolve_gguf
    from llmjax.io.models import ModelLoadError

    try:
        gguf_path = resolve_gguf(args.gguf)
        model = source_model(args, gguf_path)
    except (GGUFError, ModelLoadError) as error:
        print(f"python -m experiments bench_cpu_decode: {error}", file=sys.stderr)
        return 2
    ids, prompt_format = prompt_ids(model, args)
    tokenizer = model.tokenizer
    name = args.model or (args.ckpt.name if args.ckpt is not None else gguf_path.stem)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": thread_count(), "jax": jax.__version__,
               "device": str(jax.devices()[0]), "load_average_start": load_average()}
    with contextlib.ExitStack() as stack:
        folder = args.export_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_cpu_decode-")))
        paths = export_precisions(model, args.precisions, folder, name)
        if "file" in args.precisions:
            paths = {"file": gguf_path, **paths}
        del model  # the float32 source weights: not held while timing
        print(f"{name} ({', '.join(f'{p}: {q.name}' for p, q in paths.items())}): {len(ids)}-token {prompt_format} "
              f"prompt, {args.new_tokens} new tokens, median of {args.repeats}; {machine['cpu']}, {machine['threads']} "
              f"threads, load average {machine['load_average_start']}", flush=True)
        bandwidth = read_bandwidth(args.bandwidth_mib)
        print(f"read bandwidth ({args.bandwidth_mib} MiB float32 column sum, XLA): {bandwidth:.1f} GB/s", flush=True)

        results = {}
        for precision in args.precisions:
            results.update(run_precision(precision, paths[precision], ids, args, tokenizer))
        if "transformers" in args.peers:
            on = paths.get("file") or paths.get("f16") or next(iter(paths.values()))
            results["transformers"] = time_transformers(on, ids, args)
            print(f"transformers ({on.name}): {results['transformers'].get('skipped') or 'done'}", flush=True)
    compare_with_peers(results)
    machine["load_average_end"] = load_average()
    print_table(results, bandwidth)
    for key, r in results.items():
        versus = r.get("vs_llama_cpp")
        if key.startswith("f16/") and versus is not None:
            verdict = ("equal to" if versus["same_tokens"]
                       else f"differ (first at token {versus['first_difference']}) from")
            print(f"greedy check: llama.cpp's {args.new_tokens} tokens from our f16 file {verdict} ours ({key})")
    print(f"load average at the start {machine['load_average_start']}, at the end {machine['load_average_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": name, "files": {p: q.name for p, q in paths.items()}, "prompt": args.prompt,
              "prompt_format": prompt_format, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
              "repeats": args.repeats, "machine": machine, "read_bandwidth_gb_s": bandwidth, "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
