"""Long-context evaluation: passkey retrieval (needle in a haystack) and loss by position.

    filler = tokenizer.encode(default_filler_text())
    prompt = needle_prompt(tokenizer, filler, length=2048, depth=0.5, passkey=48213)
    prompt.tokens                       # int32 [2048]: filler, the needle at half depth, the question at the end
    prompt.tokens[prompt.needle_start : prompt.needle_end]   # "The pass key is 48213. Remember it. ..."
    prompt.answer                       # ids of " 48213", what should follow the prompt
    scores = score_prompts(params, cfg, tokenizer, [prompt])  # greedy generation + teacher-forced argmax

    losses = loss_by_position(params, cfg, tokens)   # tokens [batch, seq] -> mean loss [seq - 1] per position
    position_buckets(losses)            # log2 buckets of context length: 1, 2-3, 4-7, 8-15, ...

The passkey test (Mohtashami & Jaggi 2023, "Landmark Attention"; the needle-in-a-haystack sweeps after it) hides
one sentence with a 5-digit number in unrelated text at a chosen fractional depth and asks for the number at the
end: a model that uses its whole context window finds it at every length and depth. Two scores:
- generate (reported): greedy decoding of len(answer) tokens after the prompt with llmjax.infer.generate; correct
  when the first run of digits in the decoded text is the passkey.
- teacher-forced (cheaper: one forward pass): correct when the argmax at every answer position is the answer token.

Loss by position says whether more context keeps helping: the mean next-token loss at each context length
(position p predicts token p from tokens 0..p-1), averaged over held-out documents and over log2 buckets of p.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig

NEEDLE_TEMPLATE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key? The pass key is"
SEPARATOR = "\n"  # between the filler and the needle / question: on a line of their own
SCORINGS = ("generate", "teacher-forced")


class LongContextError(ValueError):
    """A long-context request that cannot be built as asked (one line naming the argument)."""


@dataclass(frozen=True)
class NeedlePrompt:
    """A passkey prompt: tokens [length] ending with the question, so the answer's tokens follow it."""

    tokens: np.ndarray    # int32 [length]
    needle_start: int     # tokens[needle_start:needle_end] decode to `needle`
    needle_end: int
    answer: list[int]     # ids of " " + passkey: what greedy decoding should produce after `tokens`
    passkey: str          # the digits
    needle: str           # the needle sentence
    depth: float          # where the needle sits in the filler, 0 (start) .. 1 (just before the question)

    @property
    def length(self) -> int:
        return len(self.tokens)


# --- prompts ---------------------------------------------------------------------------------------------------

def default_filler_text(max_chars: int = 400_000) -> str:
    """Filler: up to max_chars characters of the default corpus (the Python standard library's source), its held-out
    files (validation split) first, then its training files, each in path order."""
    from llmjax.data.corpus import default_corpus_split, read_text

    texts, total = [], 0
    for path in sorted(default_corpus_split("validation")) + sorted(default_corpus_split("train")):
        texts.append(read_text(path))
        total += len(texts[-1]) + 2
        if total >= max_chars:
            break
    return "\n\n".join(texts)[:max_chars]


def needle_overhead(tokenizer, passkey: int | str) -> int:
    """Tokens of a prompt that are not filler: BOS (where the tokenizer adds one), needle, question, separators."""
    parts = _prompt_parts(tokenizer, _passkey_digits(passkey))
    return sum(len(part) for part in parts[:-1])  # all but the answer


def _passkey_digits(passkey: int | str) -> str:
    digits = str(passkey)
    if not digits.isdigit():
        raise LongContextError(f"passkey={passkey!r}: must be a non-negative integer (its digits are the answer)")
    return digits


def _prompt_parts(tokenizer, digits: str) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int]]:
    """(prefix BOS, separator, needle, separator, question, answer) ids."""
    special = tokenizer.special_ids
    prefix = [special.bos] if special.add_bos and special.bos is not None else []
    separator = tokenizer.encode(SEPARATOR, allowed_special=set())
    needle = tokenizer.encode(NEEDLE_TEMPLATE.format(passkey=digits), allowed_special=set())
    question = tokenizer.encode(SEPARATOR + QUESTION, allowed_special=set())
    answer = tokenizer.encode(" " + digits, allowed_special=set())
    return prefix, separator, needle, separator, question, answer


def needle_prompt(tokenizer, filler_tokens: Sequence[int] | np.ndarray, length: int, depth: float,
                  passkey: int | str) -> NeedlePrompt:
    """A passkey prompt of exactly `length` tokens: the first filler tokens with the needle sentence (on a line of its
    own) inserted at token boundary round(depth * filler) of them, then the question "What is the pass key? The pass
    key is", so the passkey's tokens are the answer. depth 0: the needle right at the start (after BOS, if the
    tokenizer adds one); depth 1: right before the question. Raises LongContextError on a depth outside [0, 1], a
    needle + question that do not fit in `length`, or too little filler."""
    if not 0.0 <= float(depth) <= 1.0:
        raise LongContextError(f"depth={depth}: must be in [0, 1] (0: the needle at the start, 1: at the end)")
    digits = _passkey_digits(passkey)
    prefix, before, needle, after, question, answer = _prompt_parts(tokenizer, digits)
    overhead = len(prefix) + len(before) + len(needle) + len(after) + len(question)
    if length < overhead:
        raise LongContextError(f"length={length}: the needle and question alone take {overhead} tokens; "
                               f"give a length of at least {overhead}")
    room = length - overhead
    filler = np.asarray(filler_tokens, np.int64)
    if len(filler) < room:
        raise LongContextError(f"the filler has {len(filler)} tokens; length={length} needs {room}: give more text")
    at = int(round(float(depth) * room))
    parts = [prefix, filler[:at], before, needle, after, filler[at:room], question]
    tokens = np.concatenate([np.asarray(part, np.int64) for part in parts]).astype(np.int32)  # [length]
    start = len(prefix) + at + len(before)
    return NeedlePrompt(tokens=tokens, needle_start=start, needle_end=start + len(needle), answer=list(answer),
                        passkey=digits, needle=NEEDLE_TEMPLATE.format(passkey=digits), depth=float(depth))


def random_passkey(rng: np.random.Generator, digits: int = 5) -> str:
    """A passkey of `digits` digits, the first not 0."""
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


# --- scoring ---------------------------------------------------------------------------------------------------

def answer_correct(tokenizer, generated: Sequence[int], passkey: str) -> bool:
    """Whether the first run of digits in the decoded tokens is exactly the passkey."""
    found = re.search(r"\d+", tokenizer.decode([int(t) for t in generated]))
    return found is not None and found.group() == str(passkey)


def generated_answers(params, cfg: ModelConfig, prompts: Sequence[NeedlePrompt], *, prepared=None) -> list[list[int]]:
    """Greedy continuations of each prompt, len(prompt.answer) tokens each (no end-of-text stop), in one batch."""
    from llmjax.infer.generate import generate

    most = max(len(p.answer) for p in prompts)
    out = generate(params, cfg, [p.tokens.tolist() for p in prompts], max_new_tokens=most, eos_id=None,
                   prepared=prepared)
    return [tokens[: len(p.answer)] for tokens, p in zip(out.tokens, prompts)]


@functools.partial(jax.jit, static_argnames=("cfg", "tail"))
def _predictions(params, tokens, cfg: ModelConfig, tail: int):
    """tokens [batch, seq] -> the argmax next token at the last `tail` positions [batch, tail] (real vocabulary only;
    logits of those positions only, so a long prompt costs no [batch, seq, vocab] array)."""
    from llmjax.model.transformer import hidden_states, logits_from_hidden

    x = hidden_states(params, tokens, cfg)[:, -tail:]  # [batch, tail, d_model]
    logits = logits_from_hidden(params, x, cfg)[..., : cfg.vocab_size]  # [batch, tail, vocab]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def teacher_forced_hits(params, cfg: ModelConfig, prompts: Sequence[NeedlePrompt]) -> list[bool]:
    """Whether, fed prompt + answer, the model's argmax at every answer position is the answer token: one forward
    pass per prompt length, answers of different lengths padded on the right (which causal attention ignores)."""
    hits = {}
    for length in sorted({p.length for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if p.length == length]
        most = max(len(prompts[i].answer) for i in rows)
        tokens = np.zeros((len(rows), length + most - 1), np.int32)  # [batch, length + answer - 1]
        for row, i in enumerate(rows):
            fed = np.concatenate([prompts[i].tokens, np.asarray(prompts[i].answer[:-1], np.int32)])
            tokens[row, : len(fed)] = fed
        predicted = np.asarray(_predictions(params, jnp.asarray(tokens), cfg, most))  # [batch, most]: answer slots
        for row, i in enumerate(rows):
            answer = prompts[i].answer
            hits[i] = bool(np.array_equal(predicted[row, : len(answer)], np.asarray(answer)))
    return [hits[i] for i in range(len(prompts))]


def score_prompts(params, cfg: ModelConfig, tokenizer, prompts: Sequence[NeedlePrompt], *,
                  scoring: str = "generate", prepared=None) -> list[dict]:
    """One record per prompt: passkey, correct (by `scoring`), teacher_forced, and with scoring="generate" the
    decoded output. The two scorings: see the module docstring."""
    if scoring not in SCORINGS:
        raise LongContextError(f"scoring={scoring!r}: expected one of {', '.join(SCORINGS)}")
    if not prompts:
        raise LongContextError("no prompts to score")
    forced = teacher_forced_hits(params, cfg, prompts)
    records = [{"passkey": p.passkey, "depth": p.depth, "length": p.length, "needle_start": p.needle_start,
                "needle_end": p.needle_end, "teacher_forced": hit, "correct": hit} for p, hit in zip(prompts, forced)]
    if scoring == "generate":
        for record, p, tokens in zip(records, prompts, generated_answers(params, cfg, prompts, prepared=prepared)):
            record["output"] = tokenizer.decode(tokens)
            record["correct"] = answer_correct(tokenizer, tokens, p.passkey)
    return records


# --- loss by position ------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_losses(params, tokens, cfg: ModelConfig):
    """tokens [batch, seq] -> next-token loss (nats) [batch, seq - 1]: entry i predicts token i + 1."""
    from llmjax.model.transformer import forward

    logits = forward(params, tokens[:, :-1], cfg).astype(jnp.float32)[..., : cfg.vocab_size]  # [batch, seq-1, vocab]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, seq - 1]


def loss_by_position(params, cfg: ModelConfig, tokens) -> np.ndarray:
    """Mean next-token loss over the batch at each position: tokens [batch, seq] -> float [seq - 1], entry p - 1 the
    loss of token p given the p tokens before it (so its context length is p)."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise LongContextError(f"tokens of shape {tokens.shape}: expected [batch, seq] with seq >= 2")
    if tokens.shape[1] - 1 > cfg.max_seq_len:
        raise LongContextError(f"sequences of {tokens.shape[1]} tokens score {tokens.shape[1] - 1} positions, "
                               f"more than the model's context of {cfg.max_seq_len} (max_seq_len)")
    return np.asarray(_token_losses(params, jnp.asarray(tokens), cfg)).mean(axis=0)


def position_buckets(losses: Sequence[float] | np.ndarray) -> list[dict]:
    """Log2 buckets of context length over per-position losses (entry p - 1 at context length p): positions 1, 2-3,
    4-7, ... (the last bucket cut at the end): [{first, last, positions, mean_loss}]."""
    losses = np.asarray(losses, np.float64)
    buckets, first = [], 1
    while first <= len(losses):
        last = min(2 * first - 1, len(losses))
        buckets.append({"first": first, "last": last, "positions": last - first + 1,
                        "mean_loss": float(losses[first - 1 : last].mean())})
        first *= 2
    return buckets
