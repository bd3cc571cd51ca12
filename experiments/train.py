"""Train a model preset on token shards, with checkpoints, evaluation, samples and a loss curve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments train",
        description="Train a GPT-2 / LLaMA preset on shards written by `python -m experiments tokenize`. "
        "Running the same command again resumes from the run folder's newest checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="gpt2-mini", help="model preset (see `python -m experiments presets`)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field, e.g. --set num_layers=6 --set remat=full (repeatable)")
    p.add_argument("--data", type=Path, required=True,
                   help="folder with train/ and validation/ shards (the --out of `experiments tokenize`)")
    p.add_argument("--run-dir", type=Path, default=None, help="run folder (default: runs/train-MODEL)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (all devices and processes together)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation: split each batch into this many")
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--schedule", choices=("cosine", "linear", "wsd", "constant"), default="cosine", help="decay after warmup")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="WSD: fraction of steps spent decaying at the end")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled AdamW weight decay on matrices")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm gradient clipping; 0 disables")
    p.add_argument("--z-loss", type=float, default=0.0, help="weight of the log(Z)^2 penalty on the logits")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip updates with a NaN/inf loss instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization and batch order")
    p.add_argument("--log-every", type=int, default=10, help="steps between logged metrics")
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation runs (and samples)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (one is also written at the end)")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept besides the best by validation loss")
    p.add_argument("--sample-prompt", default="def", help="prompt for the greedy sample printed at each evaluation")
    p.add_argument("--sample-tokens", type=int, default=48, help="tokens per sample; 0 disables samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parallel = p.add_argument_group("parallelism (see llmjax/parallel)")
    parallel.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                          help="device mesh, e.g. data=2,fsdp=2,tensor=2 (axes data, fsdp, sequence, expert, tensor; "
                               "one may be -1 for the rest); default: data over all devices")
    parallel.add_argument("--sharding", default="auto", choices=("auto", "dp", "zero1", "zero2", "fsdp", "tp", "fsdp+tp", "sp"),
                          help="what the mesh axes cut: auto uses every axis (FSDP over fsdp, Megatron over tensor, ring "
                               "attention over sequence); zero1/zero2 cut optimizer state (and gradients) over data")
    parallel.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                          help="multi-process runs: address of process 0 (give with --num-processes and --process-id; "
                               "under SLURM / Open MPI leave all three out)")
    parallel.add_argument("--num-processes", type=int, default=None, help="multi-process runs: how many processes")
    parallel.add_argument("--process-id", type=int, default=None, help="multi-process runs: this process's index, from 0")
    parallel.add_argument("--init-timeout", type=float, default=300.0,
                          help="seconds to wait for the coordinator before giving up")
    return p.parse_args(argv)


def parse_overrides(pairs: list[str]) -> dict:
    """['num_layers=6', 'remat=full'] -> {'num_layers': 6, 'remat': 'full'} (values read as JSON when they parse)."""
    overrides = {}
    for pair in pairs:
        field, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE")
        try:
            overrides[field] = json.loads(text)
        except json.JSONDecodeError:
            overrides[field] = text
    return overrides


def open_data(data_dir: Path):
    """(train shards, validation shards or None, tokenizer or None) from a tokenize output folder."""
    from llmjax.data.shards import TokenShards, read_index
    from llmjax.tokenizer import TokenizerError, load_tokenizer

    train_dir = data_dir / "train"
    if not (train_dir / "index.json").is_file():
        raise SystemExit(f"no shards in {train_dir}: run `python -m experiments tokenize --out {data_dir}` first")
    copy = data_dir / "tokenizer.json"  # written by tokenize beside the shards; else the path the index records
    source = str(copy) if copy.is_file() else read_index(train_dir).get("tokenizer", {}).get("source")
    tokenizer = None
    if source:
        try:
            tokenizer = load_tokenizer(source)
        except TokenizerError as error:
            logging.warning("cannot load the shards' tokenizer %s (no samples, and the run folder gets no "
                            "tokenizer.json): %s", source, error)
    train_data = TokenShards(train_dir, tokenizer)  # with a tokenizer: checks it is the one that made the shards
    validation_dir = data_dir / "validation"
    validation_data = TokenShards(validation_dir, tokenizer) if (validation_dir / "index.json").is_file() else None
    return train_data, validation_data, tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("llmjax").setLevel(logging.INFO)
    from llmjax.parallel.distributed import DistributedError, initialize

    try:  # before anything touches the devices
        initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout)
    except DistributedError as error:
        print(f"python -m experiments train: {error}", file=sys.stderr)
        return 2
    import jax
    from llmjax.config import ConfigError, TrainConfig, get_config
    from llmjax.data.shards import TokenShardsError
    from llmjax.train.checkpoint import CheckpointError
    from llmjax.train.loop import RunConfig, TrainingError, train

    try:
        train_data, validation_data, tokenizer = open_data(args.data)
        vocab_size = int(train_data.index["tokenizer"]["vocab_size"])
        model_cfg = get_config(args.model, **{"vocab_size": vocab_size, **parse_overrides(args.set)})
        train_cfg = TrainConfig(
            lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=min(args.warmup, args.steps), total_steps=args.steps,
            schedule=args.schedule, decay_fraction=args.decay_fraction, weight_decay=args.weight_decay, beta2=args.beta2,
            grad_clip=args.grad_clip or None, micro_batches=args.micro_batches, z_loss=args.z_loss,
            skip_nonfinite=args.skip_nonfinite,
        )
        if args.seq > model_cfg.max_seq_len:
            raise ConfigError(f"--seq {args.seq} exceeds {args.model}'s max_seq_len={model_cfg.max_seq_len}; "
                              f"lower --seq or --set max_seq_len={args.seq}")
        run = RunConfig(
            run_dir=args.run_dir or Path("runs") / f"train-{args.model}", batch_size=args.batch, seq_len=args.seq,
            seed=args.seed, log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
            save_every=args.save_every, keep_last=args.keep_last, sample_prompt=args.sample_prompt,
            sample_tokens=args.sample_tokens, progress=not args.no_progress and jax.process_index() == 0,
            mesh=args.mesh, sharding=args.sharding,
        )
        if tokenizer is not None and jax.process_index() == 0:  # so generate / needle / serve --ckpt RUN can read it
            tokenizer.save(Path(run.run_dir) / "tokenizer.json")
        summary = train(model_cfg, train_cfg, run, train_data, validation_data, tokenizer)
    except (ConfigError, TokenShardsError, CheckpointError, TrainingError) as error:
        print(f"python -m experiments train: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    print(f"run folder: {run.run_dir} (metrics.jsonl, tensorboard/, checkpoints/, loss.png)")
    return 0
