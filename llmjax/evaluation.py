"""Evaluating a language model on real text: perplexity over long token streams, and fixed prompts.

    tokens = tokenizer.encode(held_out_text("stdlib-docstrings"))
    nll, count = stream_nll(params, cfg, tokens, window=512, stride=256)    # summed nats, tokens scored
    perplexity = math.exp(nll / count)

Perplexity follows the sliding-window rule of Hugging Face's guide: windows of `window` tokens every `stride`
tokens, each scoring only the tokens the previous window did not (so every token after the first is scored
once, with at least window - stride tokens of context once the stream is long enough). The texts are on every
machine: held-out files of the default corpus (the Python standard library's source, its validation split) and
English passages from the standard library's documentation strings (the module docstrings of a fixed list of
modules, prose rather than code).
"""

from __future__ import annotations

import ast
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig

# Modules whose docstrings are long English prose (not code): the "stdlib-docstrings" text, in this order.
DOCSTRING_MODULES = ("argparse", "asyncio/events", "collections/__init__", "contextlib", "dataclasses", "decimal",
                     "difflib", "email/__init__", "enum", "fractions", "functools", "heapq", "inspect",
                     "logging/__init__", "pickle", "random", "sched", "statistics", "string", "subprocess", "tarfile",
                     "textwrap", "threading", "typing", "unittest/__init__", "zipfile/__init__")
HELD_OUT_TEXTS = ("stdlib-docstrings", "default-corpus-validation")

# Fixed prompts for greedy answers: factual questions and small coding tasks.
FACTUAL_PROMPTS = (
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "How many days are there in a leap year?",
    "What planet is known as the Red Planet?",
)
CODING_PROMPTS = (
    "Write a Python function that returns the factorial of n.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that reverses a list.",
    "How do I read a text file line by line in Python?",
    "Write a Python function that returns the largest number in a list.",
)
PROMPTS = FACTUAL_PROMPTS + CODING_PROMPTS


def stdlib_docstrings() -> str:
    """The module docstrings of DOCSTRING_MODULES (those this Python has), separated by blank lines."""
    from llmjax.data.corpus import stdlib_folder

    root, passages = stdlib_folder(), []
    for module in DOCSTRING_MODULES:
        path = root / f"{module}.py"
        if path.is_file():
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            if docstring:
                passages.append(docstring.strip())
    return "\n\n".join(passages)


def default_corpus_validation(max_chars: int = 200_000) -> str:
    """The first max_chars characters of the default corpus's validation files (sorted by path), joined."""
    from llmjax.data.corpus import default_corpus_split, read_text

    texts, total = [], 0
    for path in sorted(default_corpus_split("validation")):
        texts.append(read_text(path))
        total += len(texts[-1])
        if total >= max_chars:
            break
    return "\n\n".join(texts)[:max_chars]


def held_out_text(name: str) -> str:
    """One of HELD_OUT_TEXTS."""
    if name == "stdlib-docstrings":
        return stdlib_docstrings()
    if name == "default-corpus-validation":
        return default_corpus_validation()
    raise ValueError(f"unknown held-out text {name!r}; known: {', '.join(HELD_OUT_TEXTS)}")


def window_starts(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over a stream of num_tokens tokens: the windows
    [start, end) every `stride` tokens, each scoring the targets from `first` (relative to start) on."""
    if not 0 < stride < window:  # windows overlap: each window's first token is context, never a target
        raise ValueError(f"stride must be in 1..window - 1 ({window - 1}), not {stride}")
    spans, scored_until = [], 1  # token 0 has no context: never scored
    for start in range(0, max(num_tokens - 1, 1), stride):
        end = min(start + window, num_tokens)
        spans.append((start, end, scored_until - start))
        scored_until = end
        if end == num_tokens:
            break
    return spans


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window_nll(params, tokens, first, end, cfg: ModelConfig):
    """Summed negative log-likelihood of the targets tokens[0, p] for first <= p < end, one window [1, window]
    (positions from `end` on are padding: causal attention keeps the scored logits exact)."""
    from llmjax.model.transformer import forward

    logits = forward(params, tokens[:, :-1], cfg).astype(jnp.float32)[..., : cfg.vocab_size]  # [1, window - 1, vocab]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [1, window - 1]
    positions = jnp.arange(1, tokens.shape[1])
    return jnp.where((positions >= first) & (positions < end), nll, 0.0).sum()


def stream_nll(params: dict, cfg: ModelConfig, tokens, *, window: int = 512, stride: int = 256) -> tuple[float, int]:
    """(summed nats, tokens scored) of a token stream under the model, by sliding windows (see the module); every
    window is padded to one length, so this compiles once."""
    tokens = np.asarray(tokens, np.int32)
    window = min(window, cfg.max_seq_len + 1, len(tokens))
    total, count = 0.0, 0
    for start, end, first in window_starts(len(tokens), window, min(stride, window - 1)):
        piece = np.zeros((1, window), np.int32)
        piece[0, : end - start] = tokens[start:end]
        total += float(_window_nll(params, jnp.asarray(piece), first, end - start, cfg))
        count += end - start - first
    return total, count


def perplexity(params: dict, cfg: ModelConfig, tokens, *, window: int = 512, stride: int = 256) -> float:
    nll, count = stream_nll(params, cfg, tokens, window=window, stride=stride)
    return float(np.exp(nll / count))


@functools.partial(jax.jit, static_argnames=("cfg", "num_targets"))
def _target_losses(params, tokens, cfg: ModelConfig, num_targets: int):
    """tokens [batch, seq] -> the next-token loss (nats) of the last num_targets tokens [batch, num_targets]."""
    from llmjax.model.transformer import forward

    logits = forward(params, tokens[:, :-1], cfg)[:, -num_targets:, : cfg.vocab_size].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [batch, num_targets, vocab]
    return -jnp.take_along_axis(logp, tokens[:, -num_targets:, None], axis=-1)[..., 0]


def target_token_losses(params: dict, cfg: ModelConfig, tokens, num_targets: int) -> np.ndarray:
    """Loss (nats) of each of the last `num_targets` tokens of every row given all the tokens before it: tokens
    [batch, seq] -> float32 [batch, num_targets]. The rest of a row is context only (never scored): how the RAG
    evaluation scores a target chunk after its preceding text, with or without retrieved neighbours."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or not 1 <= num_targets < tokens.shape[1]:
        raise ValueError(f"tokens of shape {tokens.shape} with num_targets={num_targets}: expected [batch, seq] and "
                         "1 <= num_targets < seq (at least one token of context)")
    if tokens.shape[1] - 1 > cfg.max_seq_len:
        raise ValueError(f"rows of {tokens.shape[1]} tokens need {tokens.shape[1] - 1} positions, more than the "
                         f"model's context of {cfg.max_seq_len} (max_seq_len)")
    return np.asarray(_target_losses(params, jnp.asarray(tokens), cfg, int(num_targets)))
