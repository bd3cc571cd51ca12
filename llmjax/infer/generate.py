"""Generation for samples shown during training: greedy, or sampled at a temperature.

The sequence lives in a fixed [1, length] buffer, so one compiled program serves every step and
every prompt length; each step re-runs the model over the buffer (no KV cache: fine for the short
samples printed while training, and exact).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.model.transformer import forward


@functools.partial(jax.jit, static_argnames=("cfg",))
def _fill(params, buffer: jax.Array, prompt_length: jax.Array, temperature: jax.Array, key: jax.Array,
          cfg: ModelConfig) -> jax.Array:
    """Fill buffer [1, length] after its first prompt_length tokens; temperature 0 is greedy."""

    def next_token(index, buffer):
        logits = forward(params, buffer, cfg)[0, index - 1]  # [padded_vocab]; later positions are masked out
        sampled = jax.random.categorical(jax.random.fold_in(key, index), logits / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(buffer.dtype)
        return buffer.at[0, index].set(token)

    return jax.lax.fori_loop(prompt_length, buffer.shape[1], next_token, buffer)


def continuation(params, cfg: ModelConfig, prompt_ids: list[int], num_tokens: int, *,
                 temperature: float = 0.0, seed: int = 0) -> list[int]:
    """The next `num_tokens` ids after a prompt (cut to fit the context window): greedy when
    temperature is 0, else sampled from softmax(logits / temperature) with the given seed."""
    if not prompt_ids:
        raise ValueError("continuation needs a prompt of at least one token")
    prompt_ids = prompt_ids[-max(1, cfg.max_seq_len - num_tokens) :]  # keep the prompt's end, leave room
    length = min(len(prompt_ids) + num_tokens, cfg.max_seq_len)
    buffer = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids, jnp.int32))
    filled = _fill(params, buffer, jnp.asarray(len(prompt_ids)), jnp.asarray(temperature, jnp.float32),
                   jax.random.key(seed), cfg)
    return [int(t) for t in filled[0, len(prompt_ids) :]]


def greedy_continuation(params, cfg: ModelConfig, prompt_ids: list[int], num_tokens: int) -> list[int]:
    return continuation(params, cfg, prompt_ids, num_tokens)
