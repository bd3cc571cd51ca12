"""Multi-head attention with grouped-query heads, causal / sliding-window / segment masking.

`attention_layer` projects, rotates and mixes; `dot_product_attention` is the one entry point
for the attention core, with the implementation chosen by name (`impl="xla"` here; the Pallas
and cuDNN kernels plug in behind the same signature).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.model.layers import residual_std
from llmjax.model.params import ParamSpec, normal, zeros
from llmjax.model.rope import apply_rope


def attention_spec(cfg: ModelConfig) -> dict:
    d, h, kv, hd, dtype = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype

    def projection(shape, axes, std):
        spec = {"kernel": ParamSpec(shape, axes, normal(std), dtype)}
        if cfg.attention_bias:
            out_shape, out_axes = (shape[1:], axes[1:]) if axes[0] == "embed" else (shape[-1:], axes[-1:])
            spec["bias"] = ParamSpec(out_shape, out_axes, zeros, dtype)
        return spec

    return {
        "q": projection((d, h, hd), ("embed", "heads", "head_dim"), cfg.init_std),
        "k": projection((d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std),
        "v": projection((d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std),
        "o": projection((h, hd, d), ("heads", "head_dim", "embed"), residual_std(cfg)),
    }


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

    Queries are aligned to the end of the keys (query i sits at key position i + kv_len - q_len),
    which is plain self-attention when the lengths match and decoding when the keys are a cache.
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


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention in plain jnp; K/V heads are shared by groups of query heads, never repeated.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim];
    mask [batch or 1, q_len, kv_len] -> [batch, q_len, heads, head_dim].
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)  # [b, s, kv_heads, group, d]
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5  # [b, kv_heads, group, s, t] float32
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


ATTENTION_IMPLS = {"xla": xla_attention}


def dot_product_attention(q, k, v, mask, *, impl: str = "xla") -> jax.Array:
    return ATTENTION_IMPLS[impl](q, k, v, mask)


def attention_layer(
    params: dict, x: jax.Array, positions: jax.Array, mask: jax.Array, cfg: ModelConfig
) -> jax.Array:
    """x [batch, seq, d_model] -> [batch, seq, d_model]."""

    def project(p, x):
        y = jnp.einsum("bsd,dhk->bshk", x, p["kernel"])
        return y + p["bias"] if "bias" in p else y

    q = project(params["q"], x)  # [batch, seq, heads, head_dim]
    k = project(params["k"], x)  # [batch, seq, kv_heads, head_dim]
    v = project(params["v"], x)
    if cfg.positions == "rope":
        q, k = apply_rope(q, positions, cfg), apply_rope(k, positions, cfg)
    out = dot_product_attention(q, k, v, mask, impl=cfg.attention_impl)
    y = jnp.einsum("bshk,hkd->bsd", out, params["o"]["kernel"])
    return y + params["o"]["bias"] if "bias" in params["o"] else y
