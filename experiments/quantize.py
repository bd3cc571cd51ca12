"""Quantize a run or a GGUF model (int8, int4 RTN / GPTQ, NF4, ...): validation perplexity, bytes, decode tokens/s."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmjax.io.models import GGUF_HELP

ROWS = ("float", "int8", "int4-RTN", "int4-GPTQ", "nf4")
DEFAULT_GGUF_SEQ = 512  # a GGUF's context is long (8192 for SmolLM2); perplexity windows need not be


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments quantize",
        description="Weight-only quantization of a run's newest checkpoint or of a GGUF model's float weights "
        "(dequantized from the file). One table on the same weights: float, int8 (per-channel), int4 "
        "round-to-nearest, int4 GPTQ, NF4 (QLoRA's format, double-quantized scales), plus the --method / --bits asked "
        "for when it is none of those, and with --gguf the file's own quantized blocks ('file'). Columns: validation "
        "perplexity, bytes of the weights as stored, and greedy decode tokens/s at batch 1 on this machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="a run folder written by `python -m experiments train`")
    source.add_argument("--gguf", metavar="PATH_OR_NAME", help=GGUF_HELP)
    p.add_argument("--data", type=Path, default=None,
                   help="token shards folder with train/ and validation/, or a text file (tokenized with the model's "
                        "tokenizer, its last 10%% for validation); default: RUN/tokens, and for --gguf the default "
                        "corpus (the Python standard library's source; perplexity on its held-out validation files, "
                        "GPTQ calibration on its training files, --data-tokens of each, tokenized with the file's "
                        "tokenizer)")
    p.add_argument("--data-tokens", type=int, default=200_000,
                   help="--gguf without --data: tokens of the default corpus read per split")
    p.add_argument("--formats", default=",".join(ROWS),
                   help=f"comma-separated rows to measure, from {', '.join(ROWS)} (and 'file' with --gguf: the "
                   f"GGUF's own blocks, kept quantized); the --method / --bits row is added when it is none of these")
    p.add_argument("--method", choices=("rtn", "gptq"), default="gptq", help="method of the extra row")
    p.add_argument("--bits", type=int, choices=(8, 4, 3), default=4, help="bits of the extra row")
    p.add_argument("--group", type=int, default=128, help="input rows per scale for int4 / int3 (-1: per-channel)")
    p.add_argument("--nf4-group", type=int, default=64, help="NF4 block size (QLoRA uses 64)")
    p.add_argument("--per-channel-too", action="store_true",
                   help="also int4 RTN and GPTQ rows with one scale per output channel (--group -1), where GPTQ's "
                        "error compensation matters most")
    p.add_argument("--calibration", type=int, default=64, help="GPTQ calibration sequences from the training shards")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ in column order instead of act-order")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches for the perplexity")
    p.add_argument("--batch", type=int, default=8, help="sequences per validation batch")
    p.add_argument("--seq", type=int, default=None,
                   help=f"tokens per sequence (default: the run's; --gguf: {DEFAULT_GGUF_SEQ}; at most max_seq_len)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated for the decode timing (0: skip)")
    p.add_argument("--matmul", choices=("auto", "xla", "pallas", "matvec"), default="auto",
                   help="quantized matmul while decoding: XLA's dequantize-then-dot, the fused Pallas kernel, or the "
                        "few-row CPU loop over the codes (kernels/matmul_quant.py; auto: pallas on GPUs, matvec on "
                        "CPUs for up to 8 rows, else xla)")
    p.add_argument("--decode-formats", default="all",
                   help="comma-separated rows to time decoding for (e.g. float,int4-RTN), or all")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON of the table (default: RUN/quantize.json; --gguf: runs/quantize-NAME.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation / calibration windows")
    return p.parse_args(argv)


def data_folder(args, run_config: dict) -> Path | None:
    """--data, else the run's token shards; None (the default corpus) for --gguf."""
    if args.data is not None or args.gguf is not None:
        return args.data
    for candidate in (args.ckpt / "tokens", Path(str(run_config.get("data", {}) or ""))):
        if candidate and (candidate / "validation" / "index.json").is_file():
            return candidate
    raise SystemExit(f"no token shards found for {args.ckpt}: give --data FOLDER (with train/ and validation/ "
                     f"shards, the --out of `python -m experiments tokenize`)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from llmjax.experiments.finetune_lora import open_data

    from llmjax.data.loader import batch_at
    from llmjax.infer.generate import generate
    from llmjax.io.models import ModelLoadError, load_model, model_name, restore_params
    from llmjax.quant.formats import QuantizationError
    from llmjax.quant.gptq import gptq_quantize_params
    from llmjax.quant.model import (
        param_bytes,
        quantize_params,
        quantized_decode_params,
        quantized_forward,
    )

    wanted = [f for f in args.formats.split(",") if f]
    unknown = set(wanted) - set(ROWS) - ({"file"} if args.gguf else set())
    if unknown:
        raise SystemExit(f"--formats: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}"
                         + (", file" if args.gguf else " (file: with --gguf)"))
    if args.ckpt is not None and not (args.ckpt / "config.json").is_file() and not (args.ckpt / "checkpoints").is_dir():
        raise SystemExit(f"{args.ckpt} is not a run folder (no config.json / checkpoints/)")
    run_config = {}
    if args.ckpt is not None and (args.ckpt / "config.json").is_file():
        run_config = json.loads((args.ckpt / "config.json").read_text())
    folder = data_folder(args, run_config)
    if args.ckpt is not None and not (args.ckpt / "tokenizer.json").is_file():
        (params, cfg), tokenizer = restore_params(args.ckpt), None  # shards need no tokenizer
    else:
        try:
            model = load_model(ckpt=args.ckpt, gguf=args.gguf)
        except ModelLoadError as error:
            raise SystemExit(f"quantize: {error}") from None
        params, cfg, tokenizer = model.params, model.cfg, model.tokenizer
    params = jax.device_put(params, jax.devices()[0])  # one device (the restore may lay it out over several)
    source = args.ckpt if args.ckpt is not None else args.gguf
    train, validation = open_data(folder, tokenizer, args.data_tokens)
    if validation is None:
        raise SystemExit(f"{folder} has no validation/ shards to measure perplexity on")
    default_seq = run_config.get("run", {}).get("seq_len", cfg.max_seq_len if args.ckpt else DEFAULT_GGUF_SEQ)
    seq = min(args.seq or default_seq, cfg.max_seq_len)
    for name, split in (("training", train), ("validation", validation)):
        if split.total_tokens < seq + 1:
            raise SystemExit(f"the {name} split of {folder or 'the default corpus'} has {split.total_tokens} tokens, "
                             f"fewer than one sequence of {seq + 1}; give more text or a smaller --seq")
    device = jax.devices()[0]
    print(f"{source}: {cfg.name} ({cfg.num_layers} layers, d_model {cfg.d_model}), data "
          f"{folder or 'the default corpus'}, sequences of {seq} tokens, on {device.platform} ({device.device_kind})",
          flush=True)

    val_batches = [batch_at(validation, step, batch_size=args.batch, seq_len=seq, seed=args.seed + 1)
                   for step in range(args.eval_batches)]
    forward = jax.jit(quantized_forward, static_argnums=2)

    def perplexity(qparams) -> float:
        total, count = 0.0, 0
        for windows in val_batches:
            logits = forward(qparams, jnp.asarray(windows[:, :-1]), cfg)
            logp = jax.nn.log_softmax(logits[..., : cfg.vocab_size], axis=-1)
            nll = -jnp.take_along_axis(logp, jnp.asarray(windows[:, 1:])[..., None], axis=-1)
            total, count = total + float(nll.sum()), count + nll.size
        return float(np.exp(total / count))

    matmul = args.matmul
    prompt = [int(t) for t in val_batches[0][0, :8]]

    def decode_rate(qparams) -> float | None:
        tokens = min(args.decode_tokens, cfg.max_seq_len - len(prompt))
        if tokens <= 0:
            return None
        prepared = quantized_decode_params(qparams, cfg, matmul)
        generate(None, cfg, [prompt], max_new_tokens=tokens, prepared=prepared)  # compile
        start = time.perf_counter()
        runs = 3
        for _ in range(runs):
            generate(None, cfg, [prompt], max_new_tokens=tokens, prepared=prepared)
        return runs * tokens / (time.perf_counter() - start)

    def calibration_tokens():
        rows = [batch_at(train, step, batch_size=min(args.calibration, 16), seq_len=seq, seed=args.seed)[:, :-1]
                for step in range(-(-args.calibration // 16))]
        return jnp.asarray(np.concatenate(rows)[: args.calibration])

    act_order = not args.no_act_order
    fmt_of = {8: "int8", 4: "int4", 3: "int3"}
    # (label, method, bits, group of int4 / int3: None for --group)
    rows = [("float", None, None, None), ("int8", "rtn", 8, None), ("int4-RTN", "rtn", 4, None),
            ("int4-GPTQ", "gptq", 4, None), ("nf4", "nf4", 4, None)]
    rows = [row for row in rows if row[0] in wanted]
    if "file" in wanted:
        rows.append(("file", "file", None, None))
    if args.per_channel_too:
        rows += [("int4-RTN per-channel", "rtn", 4, -1), ("int4-GPTQ per-channel", "gptq", 4, -1)]
    extra = (f"int{args.bits}-{args.method.upper()}" if args.bits != 8 else f"int8-{args.method.upper()}",
             args.method, args.bits, None)
    if (args.method, args.bits) not in {(m, b) for _, m, b, _ in rows} and extra[0] not in ROWS:
        rows.append(extra)

    def build(method, bits, group):
        group = None if bits == 8 else args.group if group is None else group
        if method is None:
            return params
        if method == "file":  # the GGUF's own block linears (Q4_1 for SmolLM2), read again, kept quantized
            return jax.device_put(load_model(gguf=args.gguf, quantized=True).params, device)
        if method == "nf4":
            return quantize_params(params, cfg, "nf4", args.nf4_group)
        if method == "rtn":
            return quantize_params(params, cfg, fmt_of[bits], group)
        started = time.perf_counter()
        quantized = gptq_quantize_params(params, cfg, calibration_tokens(), fmt_of[bits], group, act_order=act_order)
        print(f"  GPTQ int{bits}: {time.perf_counter() - started:.1f} s for {cfg.num_layers} layers", flush=True)
        return quantized

    def timed(label: str) -> bool:
        return bool(args.decode_tokens) and (args.decode_formats == "all" or label in args.decode_formats.split(","))

    def table_of(results) -> str:
        float_ppl = next((r["perplexity"] for r in results if r["format"] == "float"), results[0]["perplexity"])
        lines = [f"| format | val perplexity | vs float | weights (all) | block linears | decode tok/s "
                 f"({device.platform}, batch 1, {matmul} matmul) |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in results:
            rate = f"{r['decode_tokens_per_s']:.0f}" if r["decode_tokens_per_s"] else "-"
            lines.append(f"| {r['format']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / float_ppl - 1):+.2f}% | "
                         f"{r['bytes'] / 2**20:.2f} MiB | {r['linear_bytes'] / 2**20:.2f} MiB | {rate} |")
        return "\n".join(lines)

    def write(results, table) -> Path:
        out = args.out or (args.ckpt / "quantize.json" if args.ckpt else
                           Path("runs") / f"quantize-{model_name(gguf=args.gguf)}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(source), "model": cfg.name, "device": f"{device.platform} ({device.device_kind})",
                  "matmul": matmul, "group": args.group, "nf4_group": args.nf4_group, "act_order": act_order,
                  "seq_len": seq, "eval_tokens": args.eval_batches * args.batch * seq,
                  "calibration_sequences": args.calibration,
                  "command": "python -m experiments quantize " + " ".join(argv if argv is not None else sys.argv[2:]),
                  "rows": results, "table": table}
        out.write_text(json.dumps(record, indent=2))
        return out

    results = []
    for label, method, bits, group in rows:
        try:
            qparams = build(method, bits, group)
        except QuantizationError as error:
            raise SystemExit(f"cannot quantize {label}: {error}") from None
        row = {"format": label, "perplexity": perplexity(qparams), "bytes": param_bytes(qparams),
               "linear_bytes": param_bytes(qparams["blocks"]),
               "decode_tokens_per_s": decode_rate(qparams) if timed(label) else None}
        results.append(row)
        rate = row["decode_tokens_per_s"]
        print(f"  {label:>10}: perplexity {row['perplexity']:.3f}, {row['bytes'] / 2**20:.2f} MiB"
              + (f", decode {rate:.0f} tokens/s" if rate else ""), flush=True)
        write(results, None)  # after every row: a run cut short keeps what it measured

    table = table_of(results)
    print(table)
    out = write(results, table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
