"""Choosing the next token: greedy, temperature, top-k, top-p, min-p, penalties, logit bias, seeds.

Every setting is per request: `SamplingConfig` holds one request's, `SamplingArrays` stacks a batch's
into arrays of [batch] (and [batch, vocab] for the logit bias), so one compiled step serves a batch
that mixes greedy rows with sampled ones. The processors compose in Hugging Face's order:

    logit bias -> repetition penalty -> presence / frequency penalties -> temperature -> top-k -> top-p -> min-p

then greedy rows (temperature 0) take the argmax and the others draw by the Gumbel-max trick with a
key made from (their seed, the step): the same seed gives the same text whatever else is in the batch.
Which processors run at all is static (`SamplingFeatures`): a batch without top-k / top-p never sorts
the vocabulary, one without penalties keeps no token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


class SamplingError(ValueError):
    """A sampling setting outside its valid range."""


@dataclass(frozen=True)
class SamplingConfig:
    """One request's sampling settings (defaults: plain sampling at temperature 1).

    temperature 0 is greedy. top_k 0, top_p 1, min_p 0 and penalties 1 / 0 are off.
    repetition_penalty (CTRL / Hugging Face): logits of tokens already in the prompt or output are
    divided by it when positive, multiplied when negative. presence / frequency penalties (OpenAI):
    subtracted once per generated token seen / per occurrence. logit_bias: {token id: added logit}.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = field(default=None, hash=False, compare=False)
    seed: int = 0

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p={self.top_p}: must be in (0, 1] (1 disables it)")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise SamplingError(f"top_k={self.top_k}: must be an integer >= 0 (0 disables it)")
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p={self.min_p}: must be in [0, 1] (0 disables it)")
        if not self.repetition_penalty > 0:
            raise SamplingError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 disables it)")
        if not (np.isfinite(self.presence_penalty) and np.isfinite(self.frequency_penalty)):
            raise SamplingError("presence_penalty and frequency_penalty must be finite")

    @classmethod
    def greedy(cls, **kw) -> SamplingConfig:
        return cls(temperature=0.0, **kw)


class SamplingFeatures(NamedTuple):
    """Which processors a batch needs (static: part of the compiled program)."""

    sort: bool = False  # top-k or top-p
    min_p: bool = False
    penalties: bool = False
    logit_bias: bool = False
    sample: bool = True  # some row has temperature > 0; False: every row is greedy, no noise is drawn


class SamplingArrays(NamedTuple):
    temperature: jax.Array  # [batch] float32
    top_k: jax.Array  # [batch] int32
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array  # [batch] uint32
    logit_bias: jax.Array | None  # [batch, vocab] float32


def batch_sampling(configs: list[SamplingConfig], vocab_size: int, padded_vocab: int) -> tuple[SamplingArrays, SamplingFeatures]:
    """Stack per-request configs into arrays, and the static features the batch needs."""
    for config in configs:
        for token in (config.logit_bias or {}):
            if not 0 <= int(token) < vocab_size:
                raise SamplingError(f"logit_bias names token {token}, outside the vocabulary [0, {vocab_size})")
    column = lambda name, dtype: jnp.asarray(np.array([getattr(c, name) for c in configs], dtype))  # noqa: E731
    bias = None
    if any(c.logit_bias for c in configs):
        dense = np.zeros((len(configs), padded_vocab), np.float32)
        for row, config in enumerate(configs):
            for token, value in (config.logit_bias or {}).items():
                dense[row, int(token)] = value
        bias = jnp.asarray(dense)
    arrays = SamplingArrays(
        temperature=column("temperature", np.float32), top_k=column("top_k", np.int32),
        top_p=column("top_p", np.float32), min_p=column("min_p", np.float32),
        repetition_penalty=column("repetition_penalty", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        frequency_penalty=column("frequency_penalty", np.float32),
        seed=jnp.asarray(np.array([c.seed for c in configs], np.uint64).astype(np.uint32)), logit_bias=bias)
    features = SamplingFeatures(
        sort=any(c.top_k > 0 or c.top_p < 1 for c in configs),
        min_p=any(c.min_p > 0 for c in configs),
        penalties=any(c.repetition_penalty != 1 or c.presence_penalty or c.frequency_penalty for c in configs),
        logit_bias=bias is not None,
        sample=any(c.temperature > 0 for c in configs),
    )
    return arrays, features


def apply_penalties(logits, arrays: SamplingArrays, seen: jax.Array, generated_counts: jax.Array):
    """seen [batch, vocab] bool (prompt or output), generated_counts [batch, vocab] int32 (output only)."""
    rp = arrays.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = jnp.where(seen, penalized, logits)
    counts = generated_counts.astype(jnp.float32)
    return logits - arrays.presence_penalty[:, None] * (counts > 0) - arrays.frequency_penalty[:, None] * counts


def filter_logits(logits, arrays: SamplingArrays, features: SamplingFeatures):
    """Temperature, then top-k, top-p and min-p masks (-inf outside) on float32 logits [batch, vocab]."""
    temperature = jnp.where(arrays.temperature > 0, arrays.temperature, 1.0)[:, None]
    logits = logits / temperature
    if features.sort:
        vocab = logits.shape[-1]
        ordered = -jnp.sort(-logits, axis=-1)  # descending
        k = jnp.where(arrays.top_k > 0, jnp.minimum(arrays.top_k, vocab), vocab)
        kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [batch, 1]
        ordered = jnp.where(ordered >= kth, ordered, NEG_INF)
        # top-p: keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < arrays.top_p[:, None]) & (ordered > NEG_INF)
        keep = keep.at[:, 0].set(True)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, NEG_INF)
    if features.min_p:
        probs = jax.nn.softmax(logits, axis=-1)
        floor = arrays.min_p[:, None] * probs.max(axis=-1, keepdims=True)
        logits = jnp.where(probs >= floor, logits, NEG_INF)
    return logits


def row_keys(seeds: jax.Array, step) -> jax.Array:
    """One key per row from (its seed, the step)."""
    return jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), step))(seeds)


def choose(logits, arrays: SamplingArrays, features: SamplingFeatures, step, *, allowed=None, seen=None,
           generated_counts=None) -> jax.Array:
    """The next token per row [batch] int32 from float32 logits [batch, vocab].

    allowed [batch, vocab] bool: a constraint's mask (applied before everything, so filters never
    empty a row). seen / generated_counts: for the penalties (features.penalties)."""
    if features.logit_bias:
        logits = logits + arrays.logit_bias
    if allowed is not None:
        logits = jnp.where(allowed, logits, NEG_INF)
    if features.penalties:
        logits = apply_penalties(logits, arrays, seen, generated_counts)
    greedy = jnp.argmax(logits, axis=-1)
    if not features.sample:  # all rows greedy: no filters, noise or second argmax over the vocabulary
        return greedy.astype(jnp.int32)
    filtered = filter_logits(logits, arrays, features)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (logits.shape[-1],), jnp.float32))(row_keys(arrays.seed, step))
    sampled = jnp.argmax(filtered + gumbel, axis=-1)
    return jnp.where(arrays.temperature > 0, sampled, greedy).astype(jnp.int32)


def token_distribution(logits, arrays: SamplingArrays, features: SamplingFeatures, *, seen=None,
                       generated_counts=None) -> jax.Array:
    """The probabilities `choose` samples from (rows at temperature > 0): for tests and inspection."""
    if features.logit_bias:
        logits = logits + arrays.logit_bias
    if features.penalties:
        logits = apply_penalties(logits, arrays, seen, generated_counts)
    return jax.nn.softmax(filter_logits(logits, arrays, features), axis=-1)
