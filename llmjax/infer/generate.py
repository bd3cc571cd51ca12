"""Greedy generation for evaluation samples during training.

The sequence lives in a fixed [1, length] buffer, so one compiled program serves every step and
every prompt length; each step re-runs the model over the buffer (no KV cache: fine for the short
samples printed while training, and exact, which is what a sample shown to a person should be).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.model.transformer import forward


@functools.partial(jax.jit, static_argnames=("cfg",))
def _greedy_fill(params, buffer: jax.Array, prompt_length: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Fill buffer [1, length] after its first prompt_length tokens with greedy choices."""

    def next_token(index, buffer):
        logits = forward(params, buffer, cfg)  # [1, length, padded_vocab]; later positions are masked out
        token = jnp.argmax(logits[0, index - 1]).astype(buffer.dtype)
        return buffer.at[0, index].set(token)

    return jax.lax.fori_loop(prompt_length, buffer.shape[1], next_token, buffer)


def greedy_continuation(params, cfg: ModelConfig, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """The `num_tokens` greedy continuation of a prompt (cut to fit the context window)."""
    if not prompt_ids:
        raise ValueError("greedy_continuation needs a prompt of at least one token")
    length = min(len(prompt_ids) + num_tokens, cfg.max_seq_len)
    prompt_ids = prompt_ids[-(length - 1) :] if len(prompt_ids) >= length else prompt_ids
    buffer = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids, jnp.int32))
    filled = _greedy_fill(params, buffer, jnp.asarray(len(prompt_ids)), cfg)
    return [int(t) for t in filled[0, len(prompt_ids) :]]
