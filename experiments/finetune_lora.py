"""LoRA / QLoRA fine-tuning of a trained checkpoint or a GGUF model, with checkpoints and a loss curve.

Data: a text file, token shards, or the default corpus tokenized on the fly with the model's tokenizer."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmjax.io.models import GGUF_HELP

QUANT_CHOICES = ("none", "nf4", "int8", "int4", "file")
DEFAULT_GGUF_SEQ = 512  # a GGUF's context is long (8192 for SmolLM2); fine-tuning sequences need not be
REMAT_CHOICES = ("none", "full", "dots", "dots_no_batch", "offload")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments finetune_lora",
        description="Train LoRA adapters on top of a run's newest checkpoint or a GGUF model, the base frozen (and "
        "with --quant nf4 stored as NF4: QLoRA; with --gguf and --quant file, kept in the file's own quantized "
        "blocks). Text is tokenized with the base's tokenizer (the run's tokenizer.json, the GGUF file's). Running "
        "the same command again resumes from the newest adapter checkpoint. Writes RUN_DIR/metrics.jsonl, loss.png, "
        "checkpoints/ and adapter/ (Hugging Face PEFT files).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--ckpt", type=Path, help="base: a run folder written by `python -m experiments train`")
    base.add_argument("--gguf", metavar="PATH_OR_NAME", help="base: " + GGUF_HELP)
    p.add_argument("--data", type=Path, default=None,
                   help="a UTF-8 text file (tokenized with the base's tokenizer; its last 10%% is the validation "
                        "split) or a token shards folder with train/ (and validation/) made with the same tokenizer; "
                        "default: the default corpus (the Python standard library's source files, its validation "
                        "files held out), tokenized on the fly, --data-tokens of it")
    p.add_argument("--data-tokens", type=int, default=1_000_000,
                   help="without --data: tokens of the default corpus to train on (files read in order until this "
                        "many)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="none",
                   help="store the frozen base quantized (nf4: QLoRA); file: --gguf only, the file's own quantized "
                        "block linears as they are (Q4_1 for SmolLM2: int4 groups of 32, exact), the rest float32")
    p.add_argument("--group", type=int, default=64, help="quantization group size of the base (nf4 / int8 / int4)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="output folder (default: CKPT/lora-QUANT; --gguf: runs/lora-NAME-QUANT)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (updates scaled by alpha / rank)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (input features of the adapter path)")
    p.add_argument("--target", action="append", default=None, metavar="REGEX",
                   help="weights to adapt, a regex over names like blocks/attn/q/kernel (repeatable; default: "
                        "attention q/k/v/o and the MLP)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=None,
                   help=f"tokens per sequence (default: the base run's; --gguf: {DEFAULT_GGUF_SEQ}; <= max_seq_len)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the adapters")
    p.add_argument("--remat", choices=REMAT_CHOICES, default="full",
                   help="gradient checkpointing policy of the blocks; without it every layer's merged (dequantized) "
                        "weights are kept for the backward pass (see `python -m experiments remat_memory`)")
    p.add_argument("--log-every", type=int, default=10, help="steps between logged metrics")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation losses")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (one is also written at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapters' init, dropout and batch order")
    p.add_argument("--no-progress", action="store_true", help="no progress line (for logs)")
    return p.parse_args(argv)


def open_data(path: Path | None, tokenizer, max_tokens: int = 1_000_000):
    """(train source, validation source or None) from a text file (its last 10% the validation split), a shards
    folder (checked to be the tokenizer's), or, path None, the default corpus: its train files read in order until
    max_tokens, its validation files (~1%) held out, each tokenized with `tokenizer`."""
    import numpy as np

    from llmjax.data.loader import ArrayTokens
    from llmjax.data.shards import TokenShards, TokenShardsError

    if path is None:
        if tokenizer is None:
            raise SystemExit("the base has no tokenizer.json to tokenize the default corpus with: give --data SHARDS")
        return (ArrayTokens(corpus_tokens(tokenizer, "train", max_tokens)),
                ArrayTokens(corpus_tokens(tokenizer, "validation", max_tokens)))
    if not path.exists():
        raise SystemExit(f"--data {path} does not exist: give a text file or a token shards folder")
    if path.is_dir():
        if not (path / "train" / "index.json").is_file():
            raise SystemExit(f"{path} has no train/index.json: give the --out folder of `python -m experiments "
                             f"tokenize`, or a text file")
        try:
            validation = (TokenShards(path / "validation", tokenizer)
                          if (path / "validation" / "index.json").is_file() else None)
            return TokenShards(path / "train", tokenizer), validation
        except TokenShardsError as error:  # another tokenizer's shards
            raise SystemExit(f"--data {path}: {error}") from None
    if tokenizer is None:
        raise SystemExit(f"the base has no tokenizer.json to tokenize {path} with; tokenize it with the base's "
                         f"tokenizer (`python -m experiments tokenize`) and pass the shards folder")
    from llmjax.data.corpus import read_text

    tokens = np.asarray(tokenizer.encode(read_text(path)), np.int32)
    cut = int(len(tokens) * 0.9)
    return ArrayTokens(tokens[:cut]), ArrayTokens(tokens[cut:])


def corpus_tokens(tokenizer, split: str, max_tokens: int):
    """int32 tokens of the default corpus's `split` files in order (each ended by the tokenizer's end-of-text
    token where it has one), up to max_tokens."""
    import numpy as np

    from llmjax.data.corpus import default_corpus_split, read_text

    pieces, count = [], 0
    for file in default_corpus_split(split):
        ids = tokenizer.encode(read_text(file)) + ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
        pieces.append(np.asarray(ids[: max_tokens - count], np.int32))
        count += len(pieces[-1])
        if count >= max_tokens:
            break
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def load_base(args):
    """(params, cfg, tokenizer, name) of --ckpt (tokenizer None when the run has no tokenizer.json: shards only) or
    --gguf (--quant file: the file's blocks kept quantized)."""
    from llmjax.io.models import ModelLoadError, load_model, model_name, restore_params

    name = model_name(ckpt=args.ckpt, gguf=args.gguf)
    if args.quant == "file" and args.gguf is None:
        raise SystemExit("finetune_lora: --quant file keeps a GGUF file's quantized blocks: it needs --gguf")
    if args.ckpt is not None and not (args.ckpt / "tokenizer.json").is_file():
        return (*restore_params(args.ckpt), None, name)
    try:
        model = load_model(ckpt=args.ckpt, gguf=args.gguf, quantized=args.quant == "file")
    except ModelLoadError as error:
        raise SystemExit(f"finetune_lora: {error}") from None
    return model.params, model.cfg, model.tokenizer, name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    from llmjax.config import TrainConfig, config_to_dict
    from llmjax.data.loader import batch_at
    from llmjax.peft.lora import LoraConfig, adapter_count, save_adapters
    from llmjax.peft.train import (
        init_lora_state,
        make_lora_eval_loss,
        make_lora_train_step,
    )
    from llmjax.quant.formats import QuantizationError
    from llmjax.quant.model import (
        DEFAULT_TARGETS,
        materialize,
        param_bytes,
        quantize_params,
    )
    from llmjax.train.checkpoint import Checkpointer
    from llmjax.train.loop import MetricsLog, plot_losses
    from llmjax.train.step import windows_to_batch

    params, cfg, tokenizer, base_name = load_base(args)
    params = jax.device_put(params, jax.devices()[0])  # one device (the restore may lay it out over several)
    base = args.ckpt if args.ckpt is not None else args.gguf
    base_config = {}
    if args.ckpt is not None and (args.ckpt / "config.json").is_file():
        base_config = json.loads((args.ckpt / "config.json").read_text())
    default_seq = base_config.get("run", {}).get("seq_len", cfg.max_seq_len if args.ckpt else DEFAULT_GGUF_SEQ)
    seq = min(args.seq or default_seq, cfg.max_seq_len)
    train_data, validation_data = open_data(args.data, tokenizer, args.data_tokens)
    for name, source in (("training", train_data), ("validation", validation_data)):
        if source is not None and source.total_tokens < seq + 1:
            raise SystemExit(f"the {name} split of {args.data or 'the default corpus'} has {source.total_tokens} "
                             f"tokens, fewer than one sequence of {seq + 1}; give more text or a smaller --seq")
    try:
        lora_cfg = LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                              targets=tuple(args.target) if args.target else DEFAULT_TARGETS)
        float_bytes = param_bytes(jax.eval_shape(lambda: materialize(params, jnp.float32)))  # as float32
        if args.quant not in ("none", "file"):
            params = quantize_params(params, cfg, args.quant, args.group)
    except (ValueError, QuantizationError) as error:
        raise SystemExit(f"finetune_lora: {error}") from None
    train_cfg = TrainConfig(lr=args.lr, warmup_steps=min(args.warmup, args.steps), total_steps=args.steps,
                            weight_decay=args.weight_decay)
    default_dir = args.ckpt / f"lora-{args.quant}" if args.ckpt else Path("runs") / f"lora-{base_name}-{args.quant}"
    run_dir = args.run_dir or default_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"base": str(base), "data": str(args.data or "default corpus"), "quant": args.quant, "group": args.group,
              "lora": {**config_to_dict(lora_cfg), "targets": list(lora_cfg.targets)},
              "model_config": config_to_dict(cfg), "train_config": config_to_dict(train_cfg), "seq_len": seq,
              "batch_size": args.batch, "seed": args.seed, "remat": args.remat}
    (run_dir / "config.json").write_text(json.dumps(record, indent=2))

    key = jax.random.key(args.seed)
    try:
        state = init_lora_state(params, cfg, lora_cfg, train_cfg, jax.random.fold_in(key, 0))
    except ValueError as error:  # e.g. a --target that matches nothing
        raise SystemExit(f"finetune_lora: {error}") from None
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=2, async_save=False)
    restored = checkpointer.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state), cfg)
    if restored is not None:
        state = restored[0]
        print(f"resuming {run_dir} from step {int(state.step)}")
    step_fn = make_lora_train_step(cfg, lora_cfg, train_cfg, remat=args.remat)
    eval_fn = make_lora_eval_loss(cfg, lora_cfg, train_cfg)
    print(f"{cfg.name} from {base}: base {args.quant} ({param_bytes(params) / 2**20:.2f} MiB stored, float "
          f"{float_bytes / 2**20:.2f} MiB); {adapter_count(state.adapters):,} adapter parameters (rank {args.rank}) "
          f"on {len(jax.tree.leaves(state.adapters)) // 2} weights; optimizer state "
          f"{param_bytes(state.opt_state) / 2**20:.2f} MiB; {args.steps} steps of {args.batch} x {seq} tokens",
          flush=True)

    batch_of = lambda source, step, seed: windows_to_batch(jnp.asarray(  # noqa: E731
        batch_at(source, step, batch_size=args.batch, seq_len=seq, seed=seed)))
    log = MetricsLog(run_dir)

    def evaluate(step: int) -> float | None:
        if validation_data is None:
            return None
        losses = [float(eval_fn(state.adapters, params, batch_of(validation_data, i, args.seed + 1)))
                  for i in range(args.eval_batches)]
        loss = float(np.mean(losses))
        log.write(step, "validation", {"loss": loss})
        return loss

    started, step = time.perf_counter(), int(state.step)
    val_loss = evaluate(step) if step == 0 else None
    if val_loss is not None:
        print(f"step {step}: validation loss {val_loss:.4f} (the base model)")
    while step < args.steps:
        state, metrics = step_fn(state, params, batch_of(train_data, step, args.seed), key)
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            values = {k: float(v) for k, v in metrics.items()}
            if not np.isfinite(values["loss"]):
                raise SystemExit(f"loss is {values['loss']} at step {step}: lower --lr (now {args.lr})")
            log.write(step, "train", values)
            if not args.no_progress:
                rate = (step - int(restored[0].step if restored else 0)) / (time.perf_counter() - started)
                print(f"step {step}/{args.steps}: loss {values['loss']:.4f}, grad norm {values['grad_norm']:.3f}, "
                      f"lr {values['lr']:.2e}, {rate:.2f} steps/s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(step)
            if val_loss is not None:
                print(f"step {step}: validation loss {val_loss:.4f}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            checkpointer.save(state, record=record, val_loss=val_loss)
    checkpointer.close()
    log.close()
    plot = plot_losses(run_dir)
    adapter_dir = save_adapters(run_dir / "adapter", state.adapters, cfg, lora_cfg, base_model=str(base))
    print(f"wrote {run_dir}: checkpoints/, adapter/ ({adapter_dir.name}: PEFT safetensors), "
          f"{plot.name if plot else 'no loss plot'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
