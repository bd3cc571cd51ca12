"""Supervised fine-tuning on conversations: the loss on the assistant's replies only, many chats packed per row."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

from llmjax.io.models import add_model_flags
from llmjax.peft.flags import add_lora_arguments

DEFAULT_SEQ = 512
DEFAULT_LR, DEFAULT_LORA_LR = 2e-5, 1e-4


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments sft",
        description="Fine-tune every weight of a model on chats: each conversation is rendered with the model's chat "
        "template and tokenized turn by turn, only the assistant's replies (and the template's end-of-turn marks) "
        "carry loss, and whole conversations are packed into rows of --seq tokens (each attending only to itself). "
        "The run folder gets checkpoints/, metrics.jsonl, loss.png and the base's tokenizer and chat template, so "
        "`generate --ckpt RUN --chat ...` and `serve --ckpt RUN` chat with the result. Running the same command "
        "again resumes from the newest checkpoint. With --lora only low-rank adapters train (the same loss on the same "
        "rows), and the merged model is written at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(p, "base", "`experiments train`, `sft`")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path,
                      help="conversations, JSONL: one {\"messages\": [{\"role\": \"system\" | \"user\" | "
                           "\"assistant\", \"content\": ...}, ...]} per line, each with an assistant reply")
    data.add_argument("--task", help="conversations made from a verifiable task's training split (llmjax.posttrain."
                      "tasks: arithmetic, sort, reverse, algebra): the question, then a reference reply that ends "
                      "with 'Answer: <value>'")
    p.add_argument("--examples", type=int, default=2000, help="--task: conversations to make")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="conversations held out for the validation loss (at least one batch of rows when any)")
    p.add_argument("--chat-template", type=Path, default=None, help="a Jinja chat template replacing the base's")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: runs/sft-BASE)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="packed rows per step")
    p.add_argument("--seq", type=int, default=None, help=f"tokens per row (default: {DEFAULT_SEQ}, at most the model's)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (None: {DEFAULT_LR:g}, with --lora {DEFAULT_LORA_LR:g})")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm gradient clipping; 0 disables")
    p.add_argument("--seed", type=int, default=0, help="seed of the packing and batch order (and --task problems)")
    p.add_argument("--log-every", type=int, default=10, help="steps between logged metrics")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation losses (and a sample reply)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation (at most all)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (one is also written at the end)")
    p.add_argument("--sample-tokens", type=int, default=48, help="tokens of the sample reply at each evaluation; 0: none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...", help="device mesh (see `experiments train`)")
    p.add_argument("--sharding", default="auto", help="sharding strategy (see `experiments train`)")
    add_lora_arguments(p, "the chats")
    return p.parse_args(argv)


def load_conversations(args) -> list[list[dict]]:
    from llmjax.posttrain.chat_data import read_conversations
    from llmjax.posttrain.tasks import TASKS, sft_conversations

    if args.data is not None:
        return read_conversations(args.data)
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r}: expected one of {', '.join(TASKS)}")
    return sft_conversations(TASKS[args.task], args.examples, seed=args.seed)


def split_conversations(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded shuffle, then the last `fraction` held out."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--val-fraction {fraction}: expected a fraction in [0, 1)")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    held_out = round(len(order) * fraction)
    train = [conversations[i] for i in order[:len(order) - held_out]]
    return train, [conversations[i] for i in order[len(order) - held_out:]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("llmjax").setLevel(logging.INFO)
    prog = "python -m experiments sft"
    from llmjax.config import ConfigError, TrainConfig
    from llmjax.io.models import (
        ModelLoadError,
        load_model_from_flags,
        model_name_from_flags,
        write_model_files,
    )
    from llmjax.peft.flags import lora_config_from_args
    from llmjax.peft.run import train_lora
    from llmjax.posttrain.chat_data import (
        ChatDataError,
        pack_conversations,
        tokenize_conversations,
    )
    from llmjax.train.checkpoint import CheckpointError
    from llmjax.train.loop import RunConfig, TrainingError, train

    try:
        lora_cfg = lora_config_from_args(args)
        if lora_cfg is not None and args.mesh is not None:
            raise ValueError("--mesh: a --lora run trains on one device")
        lr = args.lr if args.lr is not None else DEFAULT_LORA_LR if lora_cfg is not None else DEFAULT_LR
        conversations = load_conversations(args)  # cheap checks first: the data, then the model
        model = load_model_from_flags(args, chat_template=args.chat_template)
        cfg = model.cfg
        seq = args.seq or min(DEFAULT_SEQ, cfg.max_seq_len)
        if seq > cfg.max_seq_len:
            raise ConfigError(f"--seq {seq} exceeds the model's max_seq_len={cfg.max_seq_len}")
        train_chats, val_chats = split_conversations(conversations, args.val_fraction, args.seed)
        tokenized = tokenize_conversations(train_chats, model.tokenizer, model.chat_format)
        train_rows = pack_conversations(tokenized, seq, seed=args.seed)
        print(f"{prog}: {len(conversations)} conversations ({len(val_chats)} held out): {train_rows.stats}",
              file=sys.stderr)
        val_rows, eval_batches = None, 0
        if val_chats:
            val_rows = pack_conversations(tokenize_conversations(val_chats, model.tokenizer, model.chat_format), seq,
                                          seed=args.seed)
            eval_batches = min(args.eval_batches, len(val_rows) // args.batch)
            if eval_batches == 0:
                print(f"{prog}: the {len(val_chats)} held-out conversations fill {len(val_rows)} rows, fewer than one "
                      f"batch of {args.batch}: no validation loss (raise --val-fraction)", file=sys.stderr)
                val_rows = None
        run_dir = args.run_dir or Path("runs") / f"sft-{model_name_from_flags(args)}"
        write_model_files(run_dir, model)
        sample_question = (val_chats or train_chats)[0]
        sample_prompt = model.chat_format.render([m for m in sample_question if m["role"] != "assistant"][:2])
        train_cfg = TrainConfig(lr=lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=min(args.warmup, args.steps),
                                total_steps=args.steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None)
        run = RunConfig(run_dir=run_dir, batch_size=args.batch, seq_len=seq, seed=args.seed, log_every=args.log_every,
                        eval_every=args.eval_every, eval_batches=max(eval_batches, 1), save_every=args.save_every,
                        sample_prompt=sample_prompt, sample_tokens=args.sample_tokens if val_rows else 0,
                        sample_stop_ids=tuple(model.end_ids),
                        progress=not args.no_progress, mesh=args.mesh, sharding=args.sharding)
        if lora_cfg is None:
            summary = train(cfg, train_cfg, run, train_rows, val_rows, model.tokenizer, initial_params=model.params)
        else:
            summary = train_lora(model.params, cfg, lora_cfg, train_cfg, run, train_rows, val_rows, model.tokenizer,
                                 base_model=str(args.ckpt or args.gguf or args.hf))
    except (ModelLoadError, ChatDataError, ConfigError, CheckpointError, TrainingError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    print(f"run folder: {run_dir} (checkpoints/, {'lora-checkpoints/, adapter/, ' if lora_cfg else ''}metrics.jsonl, "
          f"loss.png; chat with `python -m experiments generate --ckpt {run_dir} --chat ...`)")
    return 0
