"""Train a small GPT on the Python standard library's source: BPE tokenizer, shards, a few minutes of training, a sample."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments quickstart",
        description="The whole pipeline on the default corpus (the standard library's .py files on this machine, "
        "nothing downloaded): train a byte-level BPE tokenizer, tokenize the train / validation split into "
        "shards, train a small GPT-2 for a few minutes, compare its validation loss with the corpus' unigram "
        "entropy and print a sample. Everything goes to one run folder; running again resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run-dir", type=Path, default=Path("runs/quickstart"), help="the run folder")
    p.add_argument("--model", default="gpt2-mini", help="model preset (its vocabulary is replaced by the tokenizer's)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size, special tokens included")
    p.add_argument("--tokenizer-mb", type=float, default=8.0, help="MB of training text the tokenizer learns from")
    p.add_argument("--max-files", type=int, default=None, help="use only this many corpus files (for quick checks)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget; sets --steps from a timed step")
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides --minutes)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization, batches and the final sample")
    p.add_argument("--prompt", default="    def", help="prompt of the samples")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the final sample (0: greedy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    return p.parse_args(argv)


def corpus_files(split: str, max_files: int | None) -> list[Path]:
    from llmjax.data.corpus import default_corpus_split

    files = default_corpus_split(split)
    return files if max_files is None else files[: max(1, max_files if split == "train" else max_files // 50)]


def build_tokenizer(args, path: Path):
    """The run's BPE tokenizer: trained on the first --tokenizer-mb of training text, or loaded."""
    from llmjax.data.corpus import read_text
    from llmjax.tokenizer import load_tokenizer
    from llmjax.tokenizer.bpe_train import train_bpe

    if path.exists():
        return load_tokenizer(path)
    budget, texts = args.tokenizer_mb * 1e6, []
    for file in corpus_files("train", args.max_files):
        texts.append(read_text(file))
        budget -= len(texts[-1])
        if budget <= 0:
            break
    start = time.perf_counter()
    tokenizer = train_bpe(texts, args.vocab_size, progress=not args.no_progress)
    tokenizer.save(path)
    print(f"tokenizer: byte-level BPE with {tokenizer.vocab_size} ids learned from "
          f"{sum(map(len, texts)) / 1e6:.1f} MB in {time.perf_counter() - start:.1f}s -> {path}")
    return tokenizer


def build_shards(args, tokenizer, tokenizer_path: Path, data_dir: Path):
    """(train, validation) TokenShards of the default corpus split, written once per run folder."""
    from llmjax.data.corpus import corpus_documents
    from llmjax.data.shards import TokenShards, write_shards

    shards = []
    for split in ("train", "validation"):
        directory = data_dir / split
        if not (directory / "index.json").is_file():
            documents = corpus_documents(corpus_files(split, args.max_files), split=None)
            report = write_shards(documents, tokenizer, directory, workers=os.cpu_count() or 1,
                                  progress=not args.no_progress, description=f"tokenizing {split}",
                                  tokenizer_source=str(tokenizer_path))
            print(f"{split}: {report.summary()}")
        shards.append(TokenShards(directory, tokenizer))
    return shards


def unigram_cross_entropy(train_data, validation_data, vocab_size: int) -> float:
    """Nats per token of the best context-free model: validation tokens scored by the training
    set's token frequencies (add-one smoothed). A model that beats it has learned context."""
    counts = np.bincount(train_data.tokens(0, train_data.total_tokens), minlength=vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[validation_data.tokens(0, validation_data.total_tokens)].mean())


def seconds_per_step(model_cfg, train_cfg, batch: int, seq: int) -> float:
    """Time one compiled step on random tokens (the median of three after a warm-up)."""
    import jax

    from llmjax.train.step import init_train_state, make_train_step, windows_to_batch

    step = make_train_step(model_cfg, train_cfg)
    state = init_train_state(model_cfg, train_cfg, jax.random.key(0))
    windows = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (batch, seq + 1))
    state, metrics = step(state, windows_to_batch(windows))
    jax.block_until_ready(metrics)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        state, metrics = step(state, windows_to_batch(windows))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def final_sample(model_cfg, train_cfg, run, tokenizer, args) -> str:
    """A sample from the newest checkpoint of the run."""
    import jax

    from llmjax.infer.generate import continuation
    from llmjax.train.checkpoint import Checkpointer
    from llmjax.train.step import init_train_state

    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, train_cfg, jax.random.key(0)))
    state, _ = Checkpointer(run.run_dir / "checkpoints").restore_latest(abstract, model_cfg)
    ids = continuation(state.params, model_cfg, tokenizer.encode(args.prompt), 96,
                       temperature=args.temperature, seed=args.seed)
    return args.prompt + tokenizer.decode(ids)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llmjax.config import TrainConfig, count_params, get_config
    from llmjax.train.loop import RunConfig, plot_losses, read_metrics, train

    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = run_dir / "tokenizer.json"
    tokenizer = build_tokenizer(args, tokenizer_path)
    train_data, validation_data = build_shards(args, tokenizer, tokenizer_path, run_dir / "tokens")
    baseline = unigram_cross_entropy(train_data, validation_data, tokenizer.vocab_size)
    print(f"unigram entropy of the validation split: {baseline:.3f} nats/token (the loss to beat)")

    model_cfg = get_config(args.model, vocab_size=tokenizer.vocab_size, max_seq_len=max(args.seq, 64))
    plan = TrainConfig(lr=args.lr, warmup_steps=10, total_steps=100, weight_decay=0.1)
    steps = args.steps
    if steps is None:
        per_step = seconds_per_step(model_cfg, plan, args.batch, args.seq)
        steps = max(20, int(args.minutes * 60 / (per_step * 1.1)))  # 10% for evaluation and checkpoints
        print(f"model: {args.model}, {count_params(model_cfg):,} parameters; {per_step * 1e3:.0f} ms/step here, "
              f"so {steps} steps of {args.batch}x{args.seq} tokens fit in about {args.minutes:g} minutes")
    train_cfg = plan.replace(total_steps=steps, warmup_steps=min(max(steps // 20, 1), 100))
    run = RunConfig(run_dir, batch_size=args.batch, seq_len=args.seq, seed=args.seed, log_every=10,
                    eval_every=max(steps // 5, 1), eval_batches=4, save_every=max(steps // 2, 1),
                    sample_prompt=args.prompt, sample_tokens=64, progress=not args.no_progress)
    summary = train(model_cfg, train_cfg, run, train_data, validation_data, tokenizer)

    val_loss = summary.get("val_loss") or next(
        (r["loss"] for r in reversed(read_metrics(run_dir)) if r["kind"] == "validation"), float("nan"))
    plot_losses(run_dir, baselines={"unigram entropy": baseline})
    verdict = f"{baseline - val_loss:.3f} below it" if val_loss < baseline else f"still {val_loss - baseline:.3f} above it"
    print(f"\nvalidation loss {val_loss:.3f} nats/token vs unigram entropy {baseline:.3f}: {verdict} "
          f"(perplexity {math.exp(val_loss):.1f})")
    sample = final_sample(model_cfg, train_cfg, run, tokenizer, args)
    print(f"sample (temperature {args.temperature:g}, prompt {args.prompt!r}):\n{sample}")
    (run_dir / "quickstart.json").write_text(json.dumps(
        {"val_loss": val_loss, "unigram_entropy": baseline, "steps": steps, "sample": sample, **summary}, indent=2))
    print(f"\nrun folder: {run_dir} (loss.png, metrics.jsonl, tensorboard/, checkpoints/, tokenizer.json, tokens/)")
    return 0
