"""Ring attention: exact attention over a sequence cut into chunks across the `sequence` mesh axis.

Each device keeps its chunk of queries and passes its chunk of keys / values (and their segment
ids) around the ring with `ppermute`, one hop per step, merging each visiting chunk into an online
softmax (running max, running sum, float32 accumulator), as in Liu et al., "Ring Attention with
Blockwise Transformers". The next hop is sent before the current chunk is computed on, so the
transfer overlaps the compute. With causal masking a device skips chunks that lie wholly in its
future. Gradients come from autodiff (the transpose of a ppermute is the ppermute back); each
step's scores are rematerialized rather than stored.

The model calls it by itself when the active sharding rules cut the `length` axis
(llmjax.model.attention.dot_product_attention); `sharded_ring_attention` takes global arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from llmjax.parallel.logical import Rules, partition_spec


def _chunk_mask(q_start, kv_start, chunk: int, *, causal, sliding_window, q_segment_ids, kv_segment_ids):
    """[batch or 1, chunk, chunk] visibility of one key chunk from one query chunk (global positions)."""
    q_pos = q_start + jnp.arange(chunk)[:, None]
    kv_pos = kv_start + jnp.arange(chunk)[None, :]
    mask = jnp.ones((chunk, chunk), jnp.bool_)
    if causal:
        mask &= kv_pos <= q_pos
    if sliding_window is not None:
        mask &= q_pos - kv_pos < sliding_window
    mask = mask[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def ring_attention_shard(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, axis_name: str, axis_size: int,
                         causal: bool = True, sliding_window: int | None = None, logit_softcap: float | None = None):
    """The per-device body (inside shard_map): q [batch, chunk, heads, head_dim] is this device's
    chunk; k, v [batch, chunk, kv_heads, head_dim] start as this device's and travel the ring."""
    batch, chunk, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    index = jax.lax.axis_index(axis_name)
    q = q.reshape(batch, chunk, kv_heads, heads // kv_heads, head_dim)  # [b, c, kv_heads, group, d]
    ring = [(i, (i + 1) % axis_size) for i in range(axis_size)]
    lowest = jnp.finfo(jnp.float32).min

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def merge(stats, k, v, kv_segment_ids, source):
        running_max, running_sum, acc = stats  # [b, kvh, g, c], [b, kvh, g, c], [b, kvh, g, c, d] float32
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        if logit_softcap is not None:
            scores = logit_softcap * jnp.tanh(scores / logit_softcap)
        mask = _chunk_mask(index * chunk, source * chunk, chunk, causal=causal, sliding_window=sliding_window,
                           q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
        scores = jnp.where(mask[:, None, None], scores, lowest)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        probs = jnp.exp(scores - new_max[..., None])
        correction = jnp.exp(running_max - new_max)
        running_sum = running_sum * correction + probs.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgst,btkd->bkgsd", probs.astype(v.dtype), v,
                                                       preferred_element_type=jnp.float32)
        return new_max, running_sum, acc

    group = heads // kv_heads
    stats = (jnp.full((batch, kv_heads, group, chunk), lowest), jnp.zeros((batch, kv_heads, group, chunk)),
             jnp.zeros((batch, kv_heads, group, chunk, head_dim)))
    travelling = (k, v, kv_segment_ids)
    for step in range(axis_size):
        source = (index - step) % axis_size  # whose keys are here now
        if step + 1 < axis_size:  # send on before computing, so the hop overlaps the math
            arriving = jax.lax.ppermute(travelling, axis_name, ring)
        if causal and step > 0:  # chunks from later devices lie wholly in this chunk's future
            stats = jax.lax.cond(source < index, lambda s, t: merge(s, *t, source), lambda s, t: s, stats, travelling)
        else:
            stats = merge(stats, *travelling, source)
        if step + 1 < axis_size:
            travelling = arriving
    _, running_sum, acc = stats
    out = acc / running_sum[..., None]  # [b, kvh, g, c, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, chunk, heads, head_dim).astype(v.dtype)


def sharded_ring_attention(q, k, v, *, mesh: Mesh, rules: Rules, causal: bool = True,
                           sliding_window: int | None = None, q_segment_ids=None, kv_segment_ids=None,
                           logit_softcap: float | None = None):
    """Ring attention on global arrays whose `length` axis `rules` cut over one mesh axis.

    q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim] -> like q.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"ring attention is self-attention: query length {q.shape[1]} != key length {k.shape[1]}")
    q_spec = partition_spec(("batch", "length", "heads", None), rules, mesh)
    kv_spec = partition_spec(("batch", "length", "kv_heads", None), rules, mesh)
    ids_spec = PartitionSpec(*q_spec[:2])
    axis_name = q_spec[1]
    if not isinstance(axis_name, str):
        raise ValueError(f"ring attention needs the sequence cut over exactly one mesh axis, got {axis_name}")
    axis_size = mesh.shape[axis_name]
    if q.shape[1] % axis_size:
        raise ValueError(f"sequence length {q.shape[1]} does not divide over mesh axis {axis_name!r} of size "
                         f"{axis_size}; use a --seq that is a multiple of {axis_size}")
    body = functools.partial(ring_attention_shard, axis_name=axis_name, axis_size=axis_size, causal=causal,
                             sliding_window=sliding_window, logit_softcap=logit_softcap)
    if q_segment_ids is None:
        return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q, k, v)
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)
