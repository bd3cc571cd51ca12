"""Run the pipeline on the default corpus (the Python stdlib's source): text -> tokens -> model -> loss."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from tqdm import tqdm


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m experiments quickstart",
        description="Read the default corpus (the standard library's .py files on this machine), turn it into "
        "tokens, build a GPT-2-style model and compute its loss on real text. Training on this corpus "
        "comes with the training loop; until then this checks every step before it, end to end.",
    )
    parser.add_argument("--model", default="gpt2-mini", help="model preset (see `python -m experiments presets`); default gpt2-mini")
    parser.add_argument("--max-files", type=int, default=200, help="how many corpus files to read (default 200)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence, at most the model's context (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for init and batch sampling (default 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import optax

    from llmjax.config import count_params, get_config
    from llmjax.data.corpus import default_corpus_files, read_text
    from llmjax.model import forward, init_params

    files = default_corpus_files()[: args.max_files]
    text = "".join(read_text(f) for f in tqdm(files, desc="reading corpus", unit="file"))
    # Byte-level tokens (ids 0..255) stand in for the BPE tokenizer until it lands.
    tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    print(f"corpus: {len(files)} files of the standard library, {len(tokens):,} byte tokens")

    cfg = get_config(args.model, vocab_size=256)
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} exceeds {args.model}'s context of {cfg.max_seq_len}")
    params = init_params(cfg, jax.random.key(args.seed))
    print(f"model: {args.model} with a byte vocabulary, {count_params(cfg):,} parameters, on {jax.devices()[0].platform}")

    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(tokens) - args.seq - 1, size=args.batch)
    windows = np.stack([tokens[s : s + args.seq + 1] for s in starts])  # [batch, seq + 1]
    inputs, targets = windows[:, :-1], windows[:, 1:]

    @jax.jit
    def loss_fn(params, inputs, targets):
        logits = forward(params, inputs, cfg)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    start = time.perf_counter()
    loss = float(loss_fn(params, inputs, targets))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(loss_fn(params, inputs, targets))
    step_s = time.perf_counter() - start
    print(f"loss at init: {loss:.3f} (uniform over 256 bytes would be {math.log(256):.3f}); "
          f"first call {compile_s:.1f}s with compile, then {step_s * 1e3:.0f} ms for {args.batch * args.seq:,} tokens")
    print("next: training on this corpus (`python -m experiments train`) is not implemented yet.")
    return 0
