"""Attention in plain jax.numpy: the reference every attention kernel is tested against, and the
model's `impl="xla"`.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim]; heads is a
multiple of kv_heads and query head h reads kv head h // (heads // kv_heads): K/V are never repeated.
Queries are aligned to the end of the keys (query i sits at key position i + kv_len - q_len).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [batch or 1, q_len, kv_len]: True where query i may attend to key j.

    causal: keys at or before the query. sliding_window: at most this many keys back, the query's
    own included. segment ids ([batch, q_len] / [batch, kv_len]): only keys of the same segment
    (kv_segment_ids defaults to q_segment_ids, for self-attention).
    """
    q_index = jnp.arange(q_len)[:, None] + (kv_len - q_len)  # [q_len, 1]
    kv_index = jnp.arange(kv_len)[None, :]  # [1, kv_len]
    mask = jnp.ones((q_len, kv_len), jnp.bool_)
    if causal:
        mask &= kv_index <= q_index
    if sliding_window is not None:
        mask &= q_index - kv_index < sliding_window
    mask = mask[None]
    if q_segment_ids is not None:
        kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    """softmax(mask(softcap(q k^T / sqrt(head_dim)))) v, scores in float32 -> [batch, q_len, heads, head_dim].

    logit_softcap: scores become softcap * tanh(scores / softcap) (Gemma 2), before masking.
    A query with no visible key (possible only with segment ids) gets a uniform average.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)  # [b, s, kv_heads, group, d]
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5  # [b, kv_heads, group, s, t] float32
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    mask = attention_mask(q_len, kv_len, causal=causal, sliding_window=sliding_window,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)
