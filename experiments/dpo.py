"""Preference optimization (DPO, or the reference-free SimPO / ORPO) of every weight on (prompt, chosen, rejected) pairs."""

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
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1}
DEFAULT_LR, DEFAULT_LORA_LR = 1e-6, 1e-5
SAMPLED_PAIRS = "sampled_pairs.jsonl"  # --sample: kept in the run folder, so a resumed run trains on the same pairs


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments dpo",
        description="Fine-tune every weight of a model on preference pairs: each pair is a prompt (rendered with the "
        "model's chat template) and two replies, the chosen one preferred. DPO (Rafailov et al. 2023) raises the "
        "chosen reply's log-probability relative to the base model's more than the rejected one's; the base's "
        "log-probabilities are computed once before training, so only one model is held. SimPO and ORPO need no "
        "reference model. The run folder gets checkpoints/, metrics.jsonl (train and held-out preference accuracy, "
        "reward margin, chosen log-probs, KL to the base), loss.png, preference.png and the base's tokenizer and chat "
        "template, so `generate --ckpt RUN --chat ...` chats with the result. Running the same command again resumes "
        "from the newest checkpoint. With --lora only low-rank adapters train, and the reference is the base with the "
        "adapters off (no second copy of the weights); the merged model is written at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(p, "base", "`experiments train`, `sft`, `dpo`")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path,
                      help='preference pairs, JSONL: one {"prompt": [{"role": ..., "content": ...}, ...] or "text", '
                           '"chosen": "reply", "rejected": "reply"} per line')
    data.add_argument("--task", help="pairs made from a verifiable task's training split (llmjax.posttrain.tasks: "
                      "arithmetic, sort, reverse, algebra): chosen = the reference reply 'Answer: <value>', rejected = "
                      "the same reply with a wrong value; with --sample, from the base's own replies")
    p.add_argument("--examples", type=int, default=1000, help="--task: problems to make pairs of")
    p.add_argument("--sample", type=int, default=0, metavar="G",
                   help="--task: sample G replies of every problem from the base (the continuous-batching engine, "
                        "--temperature), and pair a right one (chosen) with a wrong one (rejected); problems whose "
                        "replies are all right or all wrong are skipped and counted. 0: no sampling (see --task)")
    p.add_argument("--temperature", type=float, default=1.0, help="--sample: sampling temperature")
    p.add_argument("--max-tokens", type=int, default=64, help="--sample: longest sampled reply")
    p.add_argument("--loss", choices=("dpo", "simpo", "orpo"), default="dpo",
                   help="dpo: summed log-prob ratios to the base; simpo: length-averaged log-probs with a target "
                        "margin; orpo: the chosen reply's NLL plus an odds-ratio term")
    p.add_argument("--beta", type=float, default=None,
                   help="dpo: strength of the KL constraint to the base (default 0.1); simpo: reward scale (default "
                        "2.0); unused by orpo")
    p.add_argument("--gamma", type=float, default=1.0, help="simpo: the target reward margin")
    p.add_argument("--lam", type=float, default=0.1, help="orpo: the weight of the odds-ratio term")
    p.add_argument("--nll-weight", type=float, default=0.0,
                   help="dpo / simpo: add this times the chosen replies' mean token NLL (RPO; TRL's rpo_alpha), "
                        "which keeps the chosen replies' log-probabilities from falling with the rejected ones")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="dpo: the probability that a pair's label is wrong (conservative DPO); 0: plain DPO")
    p.add_argument("--chat-template", type=Path, default=None, help="a Jinja chat template replacing the base's")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: runs/LOSS-BASE)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (twice as many sequences)")
    p.add_argument("--seq", type=int, default=None,
                   help=f"tokens per sequence, prompt + reply (default: {DEFAULT_SEQ}, at most the model's); longer "
                        "pairs are skipped and counted")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (None: {DEFAULT_LR:g}, with --lora {DEFAULT_LORA_LR:g})")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm gradient clipping; 0 disables")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="pairs held out for the evaluation (preference accuracy, margin, chosen log-probs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the batch order and the --task pairs")
    p.add_argument("--log-every", type=int, default=10, help="steps between logged training metrics")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    p.add_argument("--save-every", type=int, default=100,
                   help="steps between checkpoints (one is also written at the end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    add_lora_arguments(p, "the pairs")
    return p.parse_args(argv)


def load_pairs(args) -> list:
    """The pairs of --data, or --task's pairs made without sampling (not for --sample: see sampled_pairs)."""
    from llmjax.posttrain.preference import pairs_from_task, read_pairs
    from llmjax.posttrain.tasks import TASKS

    if args.data is not None:
        if args.sample:
            raise ValueError("--sample makes pairs of a --task's problems; --data already holds pairs")
        return read_pairs(args.data)
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r}: expected one of {', '.join(TASKS)}")
    if args.sample == 1 or args.sample < 0:
        raise ValueError(f"--sample {args.sample}: a pair needs at least 2 replies of a problem (0: no sampling)")
    if args.sample:
        return []  # made from the model's samples once it is loaded
    return pairs_from_task(TASKS[args.task], args.examples, seed=args.seed)


def sampled_pairs(args, model, prog: str) -> list:
    """--task --sample G: G replies of each of --examples training problems, sampled from the model with the
    engine; one (right, wrong) pair per problem that has both."""
    from llmjax.infer.engine import Engine, SamplingParams
    from llmjax.posttrain.preference import pairs_from_samples
    from llmjax.posttrain.rollouts import (
        reply_text,
        rollout_engine_config,
        sample_groups,
        task_prompt_ids,
    )
    from llmjax.posttrain.tasks import TASKS, problems

    task = TASKS[args.task]
    train_problems = problems(task, "train", args.examples, seed=args.seed)
    prompts = [task_prompt_ids(problem, task, model.tokenizer, model.chat_format) for problem in train_problems]
    engine = Engine(model.params, model.cfg, rollout_engine_config(prompts, args.max_tokens, model.cfg.max_seq_len),
                    eos_token_id=model.end_ids[0] if model.end_ids else None)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              stop_token_ids=tuple(model.end_ids[1:]))
    rollouts = sample_groups(engine, prompts, args.sample, sampling, seed=args.seed)
    replies = [[] for _ in train_problems]
    for rollout in rollouts:
        replies[rollout.prompt_index].append(reply_text(rollout, model.tokenizer, model.end_ids))
    made = pairs_from_samples(task, train_problems, replies, seed=args.seed)
    print(f"{prog}: {args.sample} samples of {made.problems} problems: {len(made.pairs)} pairs; skipped "
          f"{made.all_right} all right and {made.all_wrong} all wrong", file=sys.stderr)
    return made.pairs


def sampled_pairs_of_run(args, model, path: Path, prog: str) -> list:
    """The run's sampled pairs: read from `path` when an earlier start of the run wrote it (so a resumed run trains
    on the same pairs), else sampled (`sampled_pairs`) and written there."""
    from llmjax.posttrain.chat_data import ChatDataError
    from llmjax.posttrain.preference import read_pairs

    if path.exists():
        print(f"{prog}: the pairs sampled when this run started, from {path}", file=sys.stderr)
        return read_pairs(path)
    pairs = sampled_pairs(args, model, prog)
    if not pairs:
        raise ChatDataError(f"no problem of --examples {args.examples} got both a right and a wrong reply in "
                            f"--sample {args.sample}: raise them, or --temperature")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps({"prompt": list(pair.prompt), "chosen": pair.chosen,
                                             "rejected": pair.rejected}) + "\n" for pair in pairs))
    temporary.replace(path)  # atomic: a run stopped while writing samples again
    return pairs


def split_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, then the last `fraction` held out."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--val-fraction {fraction}: expected a fraction in [0, 1)")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held_out = round(len(order) * fraction)
    return [pairs[i] for i in order[:len(order) - held_out]], [pairs[i] for i in order[len(order) - held_out:]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("llmjax").setLevel(logging.INFO)
    prog = "python -m experiments dpo"
    from llmjax.config import ConfigError, TrainConfig
    from llmjax.io.models import (
        ModelLoadError,
        load_model_from_flags,
        model_name_from_flags,
        write_model_files,
    )
    from llmjax.peft.flags import lora_config_from_args
    from llmjax.posttrain.chat_data import ChatDataError
    from llmjax.posttrain.preference import (
        PreferenceObjective,
        PreferenceRun,
        tokenize_pairs,
        train_preferences,
        with_reference_logps,
    )
    from llmjax.train.checkpoint import CheckpointError
    from llmjax.train.loop import TrainingError

    try:
        lora_cfg = lora_config_from_args(args)
        lr = args.lr if args.lr is not None else DEFAULT_LORA_LR if lora_cfg is not None else DEFAULT_LR
        beta = DEFAULT_BETA[args.loss] if args.beta is None else args.beta
        objective = PreferenceObjective(args.loss, beta=beta, gamma=args.gamma, lam=args.lam,
                                        label_smoothing=args.label_smoothing, nll_weight=args.nll_weight)
        if args.batch < 1:
            raise ValueError(f"--batch {args.batch}: must be at least 1")
        pairs = load_pairs(args)  # cheap checks first: the data, then the model
        model = load_model_from_flags(args, chat_template=args.chat_template)
        run_dir = args.run_dir or Path("runs") / (
            f"{args.loss}-{model_name_from_flags(args)}")
        if args.sample:
            pairs = sampled_pairs_of_run(args, model, run_dir / SAMPLED_PAIRS, prog)
        train_pairs, held_out = split_pairs(pairs, args.val_fraction, args.seed)
        cfg = model.cfg
        seq = args.seq or min(DEFAULT_SEQ, cfg.max_seq_len)
        if seq > cfg.max_seq_len:
            raise ConfigError(f"--seq {seq} exceeds the model's max_seq_len={cfg.max_seq_len}")
        train_data = tokenize_pairs(train_pairs, model.tokenizer, model.chat_format, seq)
        if len(train_data) < args.batch:
            raise ChatDataError(f"{len(train_data)} training pairs make no batch of --batch {args.batch}; lower "
                                "--batch or give more pairs")
        validation = tokenize_pairs(held_out, model.tokenizer, model.chat_format, seq) if held_out else None
        print(f"{prog}: {len(pairs)} pairs ({len(held_out)} held out); {train_data.skipped_too_long} training pairs "
              f"longer than --seq {seq} skipped", file=sys.stderr)
        # The base's log p of every reply, once: DPO's reference (and every loss's KL metric).
        rows_per_call = 2 * args.batch
        train_data = with_reference_logps(train_data, model.params, cfg, rows_per_call)
        if validation is not None:
            validation = with_reference_logps(validation, model.params, cfg, rows_per_call)
        write_model_files(run_dir, model)
        train_cfg = TrainConfig(lr=lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=min(args.warmup, args.steps),
                                total_steps=args.steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None)
        run = PreferenceRun(run_dir=run_dir, batch_pairs=args.batch, seed=args.seed, log_every=args.log_every,
                            eval_every=args.eval_every, save_every=args.save_every, progress=not args.no_progress)
        summary = train_preferences(model.params, cfg, train_data, validation, objective, train_cfg, run,
                                    lora_cfg=lora_cfg, base_model=str(args.ckpt or args.gguf or args.hf))
    except (ModelLoadError, ChatDataError, ConfigError, CheckpointError, TrainingError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    print(f"run folder: {run_dir} (checkpoints/, {'lora-checkpoints/, adapter/, ' if lora_cfg else ''}metrics.jsonl, "
          f"loss.png, preference.png; chat with "
          f"`python -m experiments generate --ckpt {run_dir} --chat ...`)")
    return 0
