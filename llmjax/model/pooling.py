"""Pooling: a model's hidden states [batch, seq, d_model] -> one vector per sequence [batch, d_model].

Works on the hidden states of any llmjax model (`llmjax.model.hidden_states`): an encoder's (BERT, MiniLM: mean or
CLS pooling) or a decoder's (mean, or the last token, which alone has seen the whole sequence under a causal mask).
token_mask [batch, seq] is True (1) at real tokens and False (0) at padding, right- or left-padded alike. Pooling
runs in float32 whatever the compute dtype, so bfloat16 models average without losing digits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS = ("mean", "cls", "last")


def mean_pool(hidden: jax.Array, token_mask: jax.Array) -> jax.Array:
    """The average over real tokens (sentence-transformers' mean pooling); a row with none gives zeros."""
    mask = jnp.asarray(token_mask, jnp.float32)[..., None]  # [batch, seq, 1]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)  # [batch, d_model]
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def cls_pool(hidden: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """The first position's hidden state: BERT's [CLS] token (right padding puts it at position 0)."""
    return hidden[:, 0].astype(jnp.float32)


def last_token_pool(hidden: jax.Array, token_mask: jax.Array) -> jax.Array:
    """The hidden state of each row's last real token (decoders: the one that attended to all the others); a row
    with no real token gives zeros."""
    mask = jnp.asarray(token_mask, bool)  # [batch, seq]
    seq = mask.shape[1]
    last = seq - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # [batch]: the last True, for any padding side
    picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [batch, d_model]
    return jnp.where(mask.any(axis=1, keepdims=True), picked, 0.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize): cosine similarity becomes a dot
    product; a zero vector stays zero."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


_POOL = {"mean": mean_pool, "cls": cls_pool, "last": last_token_pool}


def check_pooling(pooling: str) -> None:
    if pooling not in _POOL:
        raise ValueError(f"unknown pooling {pooling!r}: choose one of {', '.join(map(repr, POOLINGS))}")


def pool(hidden: jax.Array, token_mask: jax.Array, pooling: str = "mean", *, normalize: bool = False) -> jax.Array:
    """hidden [batch, seq, d_model], token_mask [batch, seq] -> float32 [batch, d_model] by `pooling` ("mean",
    "cls" or "last"), unit length when normalize."""
    check_pooling(pooling)
    if hidden.ndim != 3 or tuple(token_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"pool: hidden must be [batch, seq, d_model] and token_mask [batch, seq], got "
                         f"{tuple(hidden.shape)} and {tuple(token_mask.shape)}")
    pooled = _POOL[pooling](hidden, token_mask)
    return l2_normalize(pooled) if normalize else pooled
