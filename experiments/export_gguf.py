"""Export a trained run (or a Hugging Face / GGUF model) as one GGUF file for llama.cpp, ollama and LM Studio."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m experiments export_gguf"
QUANT_HELP = ("f16: every matrix float16; q8_0: 8-bit blocks of 32 (near lossless, about half of f16); q4_0: 4-bit "
              "blocks of 32 (about a quarter of f16), the output head kept q8_0. Norms, biases and other 1-D tensors "
              "stay float32; a matrix whose rows are not a multiple of 32 stays f16")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a model as one GGUF file, as llama.cpp's own converter would: weights in --quant, the "
        "hyper-parameters, the tokenizer (a byte-level BPE: llama.cpp's 'gpt2' tokenizer model, with the name of "
        "its pre-tokenizer) and the chat template, if the source has one. LLaMA-family (tied or not) and GPT-2 models; "
        "MoE, sliding-window and soft-capped models are refused. The file is written under a temporary name next to "
        "--out and renamed when complete, so an interrupted export leaves nothing half-written. Run it with "
        "`llama-cli -m OUT` or `ollama create NAME -f Modelfile` (FROM OUT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, metavar="RUN",
                        help="a run folder written by `python -m experiments train` / `quickstart`: its newest "
                        "checkpoint, tokenizer.json and chat template (chat_template.jinja or tokenizer_config.json)")
    source.add_argument("--hf", metavar="FOLDER_OR_HUB_ID",
                        help="a Hugging Face model (config.json + safetensors, its tokenizer.json and chat template): "
                        "a local folder or a hub id owner/name[@revision]")
    source.add_argument("--gguf", metavar="PATH_OR_NAME",
                        help="a GGUF file (dequantized, then written again in --quant) or a packaged model's name "
                        "(smollm2-135m-instruct)")
    p.add_argument("--out", type=Path, required=True, help="the .gguf file to write; its folder must exist (an "
                   "existing file is replaced once the new one is complete)")
    p.add_argument("--quant", default="f16", metavar="{f16,q8_0,q4_0}", help=QUANT_HELP)
    p.add_argument("--tokenizer", default=None, help="the tokenizer to write instead of the source's (our .json, "
                   "a tokenizer.json, a GPT-2 folder, a .gguf, or 'bytes')")
    p.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="a Jinja chat template to write instead of the source's (as in chat_template.jinja)")
    p.add_argument("--name", default=None,
                   help="general.name in the file; not given: the run folder's or the model's name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the tensors (for logs)")
    return p.parse_args(argv)


def check_source(args) -> None:
    """Refuse a --ckpt that is no run folder or has no checkpoint before anything else is read."""
    if args.ckpt is None:
        return
    if not args.ckpt.is_dir():
        raise SystemExit(f"--ckpt {args.ckpt}: no such run folder")
    if not (args.ckpt / "checkpoints").is_dir():
        raise SystemExit(f"no checkpoints in {args.ckpt / 'checkpoints'}: give a run folder written by "
                         f"`python -m experiments train`")


def check_output(out: Path) -> None:
    """Refuse an --out that cannot be written, before the model is loaded."""
    if out.is_dir():
        raise SystemExit(f"--out {out} is a folder; give the path of the .gguf file to write, "
                         f"e.g. {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise SystemExit(f"--out {out}: the folder {out.parent} does not exist; create it first")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmjax.io import GGUFError
    from llmjax.io.gguf_export import quant_name, save_gguf
    from llmjax.io.models import ModelLoadError, load_model, model_name

    try:
        quant = quant_name(args.quant)
        check_output(args.out)
        check_source(args)
        model = load_model(ckpt=args.ckpt, hf=args.hf, gguf=args.gguf, tokenizer=args.tokenizer,
                           chat_template=args.chat_template)
        name = args.name or _gguf_name(args, model) or model_name(ckpt=args.ckpt, hf=args.hf, gguf=args.gguf)
        types = save_gguf(model.params, model.cfg, args.out, tokenizer=model.tokenizer, quant=quant, name=name,
                          chat_template=model.chat_format.template, eos_id=model.end_ids[0] if model.end_ids else None,
                          progress=not args.no_progress)
    except (GGUFError, ModelLoadError, SystemExit) as error:
        if isinstance(error, SystemExit) and not isinstance(error.code, str):
            raise
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the output folder not writable, the disk full: nothing is left behind
        print(f"{PROG}: cannot write {args.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    counts = {}
    for qtype in types.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    kinds = ", ".join(f"{count} {qtype}" for qtype, count in sorted(counts.items()))
    template = "with a" if model.chat_format.template is not None else "no"
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB): {model.cfg.num_layers} layers, "
          f"{len(types)} tensors ({kinds}), {model.tokenizer.vocab_size} tokens, {template} chat template")
    return 0


def _gguf_name(args, model) -> str | None:
    """A GGUF source's own general.name ("SmolLM2 135M Instruct"), kept when it is exported again."""
    if args.gguf is None:
        return None
    from llmjax.io.gguf import read_metadata

    return read_metadata(model.source).get("general.name")
