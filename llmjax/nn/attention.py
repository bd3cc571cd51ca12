"""Scaled dot-product attention in plain jax.numpy, with boolean masks, additive biases and grouped-query
heads. Layout [batch, seq, heads, head_dim], as jax.nn.dot_product_attention.

The model's attention kernels (cuDNN, the Pallas flash kernels of kernels/) compute the same function
for the causal / sliding-window / segment masks the model uses; this is the readable form and the
model's "xla" implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.kernels.flash_attention.reference import attention_mask
from llmjax.nn._checks import check_broadcastable, check_float, check_ndim, shape_of
from llmjax.nn.activations import softmax

LAYOUT = "[batch, heads, q_len, kv_len]"


def _check_inputs(q, k, v) -> None:
    function = "scaled_dot_product_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(function, name, x)
        check_ndim(function, name, x, (4,), "[batch, seq, heads, head_dim]")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{function}: k {shape_of(k)} and v {shape_of(v)} must agree in batch, kv_len and kv_heads")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{function}: q {shape_of(q)} and k {shape_of(k)} must agree in batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"{function}: q has {q.shape[2]} heads, not a multiple of k's {k.shape[2]} kv heads (grouped-query "
            f"attention shares each kv head among heads // kv_heads query heads)"
        )


def _as_4d(function: str, name: str, x, target: tuple) -> jax.Array:
    """A mask / bias of rank 2 ([q_len, kv_len]) or 4 (broadcastable to [batch, heads, q_len, kv_len])
    as rank 4. Rank 3 is refused: [batch, q, k] and [heads, q, k] cannot be told apart."""
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim != 4:
        raise ValueError(
            f"{function}: {name} must have rank 2 ([q_len, kv_len]) or 4 (broadcastable to {LAYOUT}), "
            f"got shape {shape_of(x)}; for a [batch, q_len, kv_len] {name} pass {name}[:, None]"
        )
    check_broadcastable(function, name, x, target, LAYOUT)
    return x


def _grouped(x: jax.Array, kv_heads: int) -> jax.Array:
    """[batch|1, heads|1, q, k] -> [batch|1, kv_heads|1, group|1, q, k], matching the grouped scores."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def scaled_dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    """softmax(q k^T * scale + bias, where mask) v.

    q [batch, q_len, heads, head_dim]; k [batch, kv_len, kv_heads, head_dim]; v [batch, kv_len, kv_heads,
    v_dim]; heads a multiple of kv_heads: query head h reads kv head h // (heads // kv_heads), without
    repeating K/V (grouped-query / multi-query attention). Returns [batch, q_len, heads, v_dim] in v's dtype.

    mask: boolean, True where a query may attend to a key; bias: float, added to the scores (ALiBi,
        relative positions). Each is [q_len, kv_len] or broadcastable to [batch, heads, q_len, kv_len].
    causal: also mask keys after the query, queries aligned to the end of the keys (query i sits at key
        position i + kv_len - q_len, as when a prompt extends a cache). `attention_mask` builds the
        causal / sliding-window / segment masks of the model as one boolean mask.
    scale: multiplies q k^T (default head_dim ** -0.5). logit_softcap: scores -> cap * tanh(scores / cap)
        (Gemma 2), applied to the scaled scores before the bias and the mask.
    A query that sees no key at all (a fully masked row) gets zeros, not an average of the values.
    Scores and softmax run in float32 (float64 for float64 inputs); the probabilities are cast to v's dtype for the second matmul.
    """
    _check_inputs(q, k, v)
    function = "scaled_dot_product_attention"
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    target = (batch, heads, q_len, kv_len)
    if causal:
        causal_part = attention_mask(q_len, kv_len, causal=True)[None]  # [1, 1, q_len, kv_len]
        mask = causal_part if mask is None else _as_4d(function, "mask", mask, target) & causal_part
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise TypeError(f"{function}: mask must be boolean (True = may attend), got {mask.dtype}; "
                            f"pass an additive float mask as bias=")
        mask = _grouped(_as_4d(function, "mask", mask, target), kv_heads)
    if bias is not None:
        check_float(function, "bias", bias)
        bias = _grouped(_as_4d(function, "bias", bias, target), kv_heads)

    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)  # [b, s, kv_heads, group, d]
    score_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 for float64 inputs
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=score_dtype)
    scores = scores * (head_dim**-0.5 if scale is None else scale)  # [b, kv_heads, group, s, t]
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    if bias is not None:
        scores = scores + bias.astype(score_dtype)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(score_dtype).min)
    probs = softmax(scores, axis=-1)
    if mask is not None:
        probs = jnp.where(mask.any(-1, keepdims=True), probs, 0)  # fully masked rows: zeros
    out = jnp.einsum("bkgst,btkv->bskgv", probs.astype(v.dtype), v)
    return out.reshape(batch, q_len, heads, v.shape[-1])
