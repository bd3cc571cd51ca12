"""Extend a trained RoPE model's context (YaRN, position interpolation or NTK-aware), fine-tuning at the new length.

    python -m experiments extend_context --ckpt runs/train-llama-125m --to 4096 --steps 200
    python -m experiments extend_context --gguf smollm2-135m-instruct --to 32768 --data runs/tokens/smollm2 \
        --compute-dtype bfloat16    # a real model: a GGUF file or a Hugging Face folder (--hf)

The base (a run's newest checkpoint, or a GGUF / Hugging Face model) is loaded, its RoPE rescaled by factor =
--to / L, L the length it was trained for (its max_seq_len; for a run that was already extended, the original length
its scaling names), max_seq_len set to --to, and every weight fine-tuned for --steps steps on windows of --to tokens
with llmjax.train's loop (fresh AdamW state, warmup then a constant learning rate, as the YaRN paper fine-tunes). The
new run folder holds what the loop writes (config.json, checkpoints/, metrics.jsonl, loss.png), the base's tokenizer
files, and an "extend_context" section in config.json (also alone in extend_context.json): the base, the scaling,
the data, and the validation loss at --to before fine-tuning (the base's RoPE unchanged, and rescaled) and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

METHODS = ("yarn", "linear", "ntk")
REMAT_CHOICES = ("none", "full", "dots", "dots_no_batch", "offload")
PROG = "python -m experiments extend_context"
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")  # copied from the base when present


class ExtendError(ValueError):
    """Input this experiment cannot use; the message names the flag to change."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Extend the context of a run trained with RoPE: rescale RoPE to --to tokens (yarn: YaRN's "
        "per-dimension interpolation plus its attention temperature; linear: position interpolation; ntk: "
        "NTK-aware theta), set max_seq_len to --to, and fine-tune every weight on windows of --to tokens. Writes a "
        "new run folder (config.json, checkpoints/, metrics.jsonl, loss.png); running the same command again "
        "resumes it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from llmjax.io.models import add_model_flags

    add_model_flags(p, "the model to extend", "`python -m experiments train` or an earlier extend_context; its "
                    "newest checkpoint is loaded")
    p.add_argument("--to", type=int, required=True,
                   help="the new context length in tokens (greater than the run's max_seq_len); also the length of "
                        "each fine-tuning sequence")
    p.add_argument("--method", choices=METHODS, default="yarn",
                   help="how RoPE is rescaled (llmjax.config.RopeScaling): yarn, linear (position interpolation) "
                        "or ntk (NTK-aware theta)")
    p.add_argument("--data", type=Path, default=None,
                   help="token shards folder with train/ (and validation/) (the --out of `python -m experiments "
                        "tokenize`, made with the model's tokenizer); default: the shards a --ckpt run records "
                        "in its config.json, if it does")
    p.add_argument("--out", type=Path, default=None,
                   help="the new run folder (default: CKPT-METHOD-TO beside CKPT; for --gguf / --hf, "
                        "runs/extend-NAME-METHOD-TO)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning optimizer steps")
    p.add_argument("--batch", type=int, default=8,
                   help="sequences of --to tokens per step (a multiple of the data-parallel devices)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate after warmup (constant; YaRN used 2e-5)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps (at most --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm gradient clipping; 0 disables")
    p.add_argument("--remat", choices=REMAT_CHOICES, default=None,
                   help="gradient checkpointing policy of the blocks for the long sequences (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    p.add_argument("--log-every", type=int, default=10, help="steps between logged metrics")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (one also at the end)")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="validation batches of --batch x --to tokens per evaluation")
    p.add_argument("--save-every", type=int, default=500,
                   help="steps between checkpoints (one is also written at the end)")
    p.add_argument("--no-eval-before", action="store_true",
                   help="skip the validation losses at --to before fine-tuning (the run's RoPE unchanged, and "
                        "rescaled)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...", help="device mesh (see `experiments train`)")
    p.add_argument("--sharding", default="auto", help="sharding strategy (see `experiments train`)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """One ExtendError per number a run cannot use, naming its flag."""
    for flag, value in (("--to", args.to), ("--steps", args.steps), ("--batch", args.batch),
                        ("--log-every", args.log_every), ("--eval-every", args.eval_every),
                        ("--eval-batches", args.eval_batches), ("--save-every", args.save_every)):
        if value < 1:
            raise ExtendError(f"{flag} {value}: must be a positive integer")
    if not args.lr > 0:
        raise ExtendError(f"--lr {args.lr}: must be > 0")
    if args.warmup < 0:
        raise ExtendError(f"--warmup {args.warmup}: must be >= 0")
    if args.grad_clip < 0:
        raise ExtendError(f"--grad-clip {args.grad_clip}: must be >= 0 (0 disables)")


def base_config(ckpt: Path):
    """The ModelConfig the run folder's newest checkpoint records (read without its arrays, so bad flags are refused
    before any weight is loaded)."""
    import orbax.checkpoint as ocp

    from llmjax.config import model_config_from_dict
    from llmjax.train.checkpoint import Checkpointer

    if not ckpt.is_dir():
        raise ExtendError(f"--ckpt {ckpt}: no such run folder")
    directory = ckpt / "checkpoints"
    checkpointer = Checkpointer(directory, async_save=False) if directory.is_dir() else None
    try:
        steps = checkpointer.steps() if checkpointer is not None else []
        if not steps:
            raise ExtendError(f"--ckpt {ckpt}: no checkpoint in {directory}; give a run folder written by "
                              f"`python -m experiments train`")
        record = checkpointer.manager.restore(steps[-1], args=ocp.args.Composite(record=ocp.args.JsonRestore()))
        return model_config_from_dict(record["record"]["model_config"])
    finally:
        if checkpointer is not None:
            checkpointer.close()


def load_base(args):
    """(the base's ModelConfig, a function giving its parameters, its LoadedModel or None for a --ckpt run). A run's
    config is read without its arrays, so bad flags are refused before any weight is loaded; a GGUF / Hugging Face
    model is loaded whole (its tokenizer and chat files go with the extended run)."""
    if args.ckpt is not None:
        cfg = base_config(args.ckpt)
        if args.compute_dtype is not None:
            cfg = cfg.replace(compute_dtype=args.compute_dtype)
        return cfg, lambda: base_params(args.ckpt), None
    from llmjax.io.models import ModelLoadError, load_model_from_flags

    flag = "--gguf" if args.gguf is not None else "--hf"
    try:
        model = load_model_from_flags(args)
    except ModelLoadError as error:
        raise ExtendError(f"{flag} {args.gguf or args.hf}: {error}") from None
    return model.cfg, lambda: model.params, model


def base_name(args) -> str:
    return str(args.ckpt or args.gguf or args.hf)


def base_params(ckpt: Path) -> dict:
    """The parameters of the run folder's newest checkpoint."""
    from llmjax.io.models import restore_params

    try:
        return restore_params(ckpt)[0]
    except SystemExit as error:  # restore_params' one-line refusals
        raise ExtendError(f"--ckpt {ckpt}: {error}") from None


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def extended_config(cfg, to: int, method: str):
    """(the ModelConfig with RoPE rescaled to `to` tokens and max_seq_len=to, the original length L): factor =
    to / L, L = cfg.max_seq_len, or for a model already scaled, the original length its scaling names (the new
    scaling replaces the old one, so scalings do not compound)."""
    from llmjax.config import RopeScaling

    if cfg.positions != "rope":
        raise ExtendError(f"the model has positions={cfg.positions!r} (learned position embeddings), not RoPE; "
                          f"its context cannot be extended by rescaling RoPE")
    if to <= cfg.max_seq_len:
        raise ExtendError(f"--to {to}: must be greater than the length the run was trained for, max_seq_len="
                          f"{cfg.max_seq_len}")
    old = cfg.rope_scaling
    if old is None:
        scaling = RopeScaling(method, factor=to / cfg.max_seq_len, original_max_seq_len=cfg.max_seq_len)
        return cfg.replace(rope_scaling=scaling, max_seq_len=to), cfg.max_seq_len
    if old.kind != method:
        raise ExtendError(f"--method {method}: the run already uses RoPE scaling {old.kind!r}; extend it further with "
                          f"--method {old.kind}")
    original = old.original_max_seq_len
    scaling = RopeScaling(method, factor=to / original, original_max_seq_len=original, beta_fast=old.beta_fast,
                          beta_slow=old.beta_slow)
    return cfg.replace(rope_scaling=scaling, max_seq_len=to), original


def recorded_data(record: dict) -> str | None:
    """The token shards folder a run's config.json names, if any (top level, under "run", or under
    "extend_context" for a run this experiment wrote)."""
    for section in (record, record.get("run", {}), record.get("extend_context", {})):
        if isinstance(section, dict) and isinstance(section.get("data"), str):
            return section["data"]
    return None


def open_shards(args, record: dict, cfg, to: int, model_tokenizer=None):
    """(shards folder, train shards, validation shards or None, tokenizer or None) of --data or the run's recorded
    shards, checked against the model's tokenizer when there is one. Validation shards shorter than one window of
    --to + 1 tokens are dropped (with a note)."""
    from llmjax.data.shards import TokenShardsError
    from llmjax.experiments.train import open_data

    data = args.data
    if data is None:
        recorded = recorded_data(record)
        if recorded is None:
            if args.ckpt is None:
                raise ExtendError(f"--data: give the token shards to fine-tune {base_name(args)} on (made by "
                                  f"`python -m experiments tokenize --tokenizer {base_name(args)}`)")
            raise ExtendError(f"--data: {args.ckpt}/config.json does not record the token shards the run was trained "
                              f"on; give --data SHARDS_DIR")
        data = Path(recorded)
    if not (data / "train" / "index.json").is_file():
        raise ExtendError(f"--data {data}: no token shards ({data}/train/index.json); give the --out folder of "
                          f"`python -m experiments tokenize`")
    try:
        train_data, validation_data, tokenizer = open_data(data)
    except TokenShardsError as error:
        raise ExtendError(f"--data {data}: {error}") from None
    made_with = train_data.index.get("tokenizer", {})
    if model_tokenizer is not None and made_with.get("fingerprint") not in (None, model_tokenizer.fingerprint()):
        raise ExtendError(f"--data {data}: the shards were made with another tokenizer than {base_name(args)}'s; "
                          f"make them with `python -m experiments tokenize --tokenizer {base_name(args)}`")
    vocab = int(made_with.get("vocab_size", 0))
    if vocab > cfg.vocab_size:
        raise ExtendError(f"--data {data}: its tokenizer has {vocab} tokens, the model's embedding {cfg.vocab_size}; "
                          f"give shards made with the run's tokenizer")
    if train_data.total_tokens < to + 1:
        raise ExtendError(f"--data {data}: the training split has {train_data.total_tokens} tokens, fewer than one "
                          f"window of --to {to} + 1")
    if validation_data is not None and validation_data.total_tokens < to + 1:
        print(f"{PROG}: the validation split of {data} has {validation_data.total_tokens} tokens, fewer than one "
              f"window of --to {to} + 1: no validation loss", file=sys.stderr)
        validation_data = None
    return data, train_data, validation_data, tokenizer


def validation_loss(params, cfg, train_cfg, validation_data, args) -> float:
    """Mean loss over the validation windows the loop evaluates (--eval-batches of --batch x --to, seed --seed)."""
    import jax.numpy as jnp

    from llmjax.data.loader import batch_at
    from llmjax.train.step import make_eval_step, windows_to_batch

    eval_step = make_eval_step(cfg, train_cfg)
    nll, tokens = 0.0, 0.0
    for index in range(args.eval_batches):
        windows = batch_at(validation_data, index, batch_size=args.batch, seq_len=args.to, seed=args.seed)
        sums = eval_step(params, windows_to_batch(jnp.asarray(windows)))
        nll, tokens = nll + float(sums["nll_sum"]), tokens + float(sums["tokens"])
    return nll / tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("llmjax").setLevel(logging.INFO)
    from llmjax.config import ConfigError, TrainConfig, config_to_dict
    from llmjax.train.checkpoint import CheckpointError
    from llmjax.train.loop import RunConfig, TrainingError, train

    try:
        check_args(args)
        if args.ckpt is not None:
            out = args.out or args.ckpt.parent / f"{args.ckpt.name}-{args.method}-{args.to}"
            if out.resolve() == args.ckpt.resolve():
                raise ExtendError(f"--out {out}: must differ from --ckpt (the extended run is a new folder)")
        else:
            from llmjax.io.models import model_name_from_flags

            out = args.out or Path("runs") / f"extend-{model_name_from_flags(args)}-{args.method}-{args.to}"
        base_cfg, load_params, model = load_base(args)
        cfg, original = extended_config(base_cfg, args.to, args.method)
        if args.remat is not None:
            cfg = cfg.replace(remat=args.remat)
        record = read_json(args.ckpt / "config.json") if args.ckpt is not None else {}
        data, train_data, validation_data, tokenizer = open_shards(args, record, cfg, args.to,
                                                                   None if model is None else model.tokenizer)
        train_cfg = TrainConfig(lr=args.lr, warmup_steps=min(args.warmup, args.steps), total_steps=args.steps,
                                schedule="constant", min_lr_ratio=1.0, weight_decay=args.weight_decay,
                                grad_clip=args.grad_clip or None)
        scaling = cfg.rope_scaling
        extension = {"base": base_name(args), "method": args.method, "from_seq_len": base_cfg.max_seq_len,
                     "original_seq_len": original, "to": args.to, "factor": scaling.factor,
                     "rope_scaling": config_to_dict(cfg)["rope_scaling"], "data": str(data)}
        print(f"{PROG}: {cfg.name} from {base_name(args)}: RoPE {args.method}, factor {scaling.factor:g} "
              f"({original} -> {args.to} tokens); {args.steps} steps of {args.batch} x {args.to} tokens into {out}",
              file=sys.stderr)
        params = load_params()
        earlier = read_json(out / "extend_context.json")  # a first run's, when resuming
        extension.update({k: v for k, v in earlier.items() if k.startswith("val_loss_before")})
        resuming = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
        if validation_data is not None and not args.no_eval_before and not resuming:
            unchanged = base_cfg.replace(max_seq_len=args.to)  # the run's RoPE as it was trained, run past its length
            for key, model_cfg in (("val_loss_before_unchanged", unchanged), ("val_loss_before_scaled", cfg)):
                extension[key] = validation_loss(params, model_cfg, train_cfg, validation_data, args)
            print(f"{PROG}: validation loss at {args.to} tokens before fine-tuning: "
                  f"{extension['val_loss_before_unchanged']:.4f} with the run's RoPE unchanged, "
                  f"{extension['val_loss_before_scaled']:.4f} with {args.method}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        (out / "extend_context.json").write_text(json.dumps(extension, indent=2))  # train() rewrites config.json
        if model is not None:  # the GGUF / Hugging Face model's tokenizer, chat template and end ids
            from llmjax.io.models import write_model_files

            write_model_files(out, model)
        for name in MODEL_FILES if args.ckpt is not None else ():
            if (args.ckpt / name).is_file():
                shutil.copyfile(args.ckpt / name, out / name)
        run = RunConfig(run_dir=out, batch_size=args.batch, seq_len=args.to, seed=args.seed, log_every=args.log_every,
                        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
                        sample_tokens=0, progress=not args.no_progress, mesh=args.mesh, sharding=args.sharding)
        summary = train(cfg, train_cfg, run, train_data, validation_data, tokenizer, initial_params=params)
    except (ExtendError, ConfigError, CheckpointError, TrainingError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    extension["val_loss_after"] = summary.get("val_loss")
    (out / "extend_context.json").write_text(json.dumps(extension, indent=2))
    written = read_json(out / "config.json")  # the loop's model, train and run settings
    (out / "config.json").write_text(json.dumps({**written, "extend_context": extension}, indent=2))
    print(json.dumps(summary))
    print(f"run folder: {out} (config.json, checkpoints/, metrics.jsonl, loss.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
