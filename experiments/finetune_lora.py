"""LoRA / QLoRA fine-tuning of a trained checkpoint on a text file or token shards, with checkpoints and a loss curve."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

QUANT_CHOICES = ("none", "nf4", "int8", "int4")
REMAT_CHOICES = ("none", "full", "dots", "dots_no_batch", "offload")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments finetune_lora",
        description="Train LoRA adapters on top of a run's newest checkpoint, the base frozen (and with --quant nf4 "
        "stored as NF4: QLoRA). Running the same command again resumes from the newest adapter checkpoint. "
        "Writes RUN_DIR/metrics.jsonl, loss.png, checkpoints/ and adapter/ (Hugging Face PEFT files).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", type=Path, required=True, help="base: a run folder written by `python -m experiments train`")
    p.add_argument("--data", type=Path, required=True,
                   help="a UTF-8 text file (tokenized with the base run's tokenizer.json; its last 10%% is the "
                        "validation split) or a token shards folder with train/ (and validation/)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="none", help="store the frozen base quantized (nf4: QLoRA)")
    p.add_argument("--group", type=int, default=64, help="quantization group size of the base")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: CKPT/lora-QUANT)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (updates scaled by alpha / rank)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (input features of the adapter path)")
    p.add_argument("--target", action="append", default=None, metavar="REGEX",
                   help="weights to adapt, a regex over names like blocks/attn/q/kernel (repeatable; default: "
                        "attention q/k/v/o and the MLP)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the base run's, <= max_seq_len)")
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


def open_data(path: Path, ckpt: Path):
    """(train source, validation source or None, tokenizer or None) from a text file or a shards folder."""
    import numpy as np

    from llmjax.data.loader import ArrayTokens
    from llmjax.data.shards import TokenShards

    if not path.exists():
        raise SystemExit(f"--data {path} does not exist: give a text file or a token shards folder")
    if path.is_dir():
        if not (path / "train" / "index.json").is_file():
            raise SystemExit(f"{path} has no train/index.json: give the --out folder of `python -m experiments "
                             f"tokenize`, or a text file")
        validation = TokenShards(path / "validation") if (path / "validation" / "index.json").is_file() else None
        return TokenShards(path / "train"), validation, None
    from llmjax.data.corpus import read_text
    from llmjax.tokenizer import load_tokenizer

    tokenizer_file = ckpt / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SystemExit(f"{ckpt} has no tokenizer.json to tokenize {path} with; tokenize it with the base's tokenizer "
                         f"(`python -m experiments tokenize`) and pass the shards folder")
    tokenizer = load_tokenizer(tokenizer_file)
    tokens = np.asarray(tokenizer.encode(read_text(path)), np.int32)
    cut = int(len(tokens) * 0.9)
    return ArrayTokens(tokens[:cut]), ArrayTokens(tokens[cut:]), tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    from llmjax.experiments.generate import restore_params
    from llmjax.config import TrainConfig, config_to_dict
    from llmjax.data.loader import batch_at
    from llmjax.peft.lora import LoraConfig, adapter_count, save_adapters
    from llmjax.peft.train import init_lora_state, make_lora_eval_loss, make_lora_train_step
    from llmjax.quant.formats import QuantizationError
    from llmjax.quant.model import DEFAULT_TARGETS, param_bytes, quantize_params
    from llmjax.train.checkpoint import Checkpointer
    from llmjax.train.loop import MetricsLog, plot_losses
    from llmjax.train.step import windows_to_batch

    params, cfg = restore_params(args.ckpt)
    params = jax.device_put(params, jax.devices()[0])  # one device (the restore may lay it out over several)
    base_config = json.loads((args.ckpt / "config.json").read_text()) if (args.ckpt / "config.json").is_file() else {}
    seq = min(args.seq or base_config.get("run", {}).get("seq_len", cfg.max_seq_len), cfg.max_seq_len)
    train_data, validation_data, _ = open_data(args.data, args.ckpt)
    for name, source in (("training", train_data), ("validation", validation_data)):
        if source is not None and source.total_tokens < seq + 1:
            raise SystemExit(f"the {name} split of {args.data} has {source.total_tokens} tokens, fewer than one "
                             f"sequence of {seq + 1}; give more text or a smaller --seq")
    try:
        lora_cfg = LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                              targets=tuple(args.target) if args.target else DEFAULT_TARGETS)
        float_bytes = param_bytes(params)
        if args.quant != "none":
            params = quantize_params(params, cfg, args.quant, args.group)
    except (ValueError, QuantizationError) as error:
        raise SystemExit(f"finetune_lora: {error}") from None
    train_cfg = TrainConfig(lr=args.lr, warmup_steps=min(args.warmup, args.steps), total_steps=args.steps,
                            weight_decay=args.weight_decay)
    run_dir = args.run_dir or args.ckpt / f"lora-{args.quant}"
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"base": str(args.ckpt), "data": str(args.data), "quant": args.quant, "group": args.group,
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
    print(f"{cfg.name} from {args.ckpt}: base {args.quant} ({param_bytes(params) / 2**20:.2f} MiB stored, float "
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
    adapter_dir = save_adapters(run_dir / "adapter", state.adapters, cfg, lora_cfg, base_model=str(args.ckpt))
    print(f"wrote {run_dir}: checkpoints/, adapter/ ({adapter_dir.name}: PEFT safetensors), "
          f"{plot.name if plot else 'no loss plot'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
