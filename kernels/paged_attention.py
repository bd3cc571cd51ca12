"""Decode attention over a paged KV cache: one new query per sequence against the blocks of its block table.

Shapes: q [batch, heads, head_dim]; k_pool, v_pool [num_blocks, block_size, kv_heads, head_dim] (one layer's
pool, shared by every sequence); block_tables [batch, max_blocks] int32 (row b's i-th block holds its tokens
i * block_size ... (i + 1) * block_size - 1; entries past the row's last block are ignored, any value);
lengths [batch] int32: tokens in the row's cache, the new one included. The query sits at position
lengths - 1 and sees the tokens at positions 0 .. lengths - 1 (with a sliding window w: the last w of
them). A row of length 0 (an empty batch slot) gets zeros. Query head h reads kv head h // (heads // kv_heads).

`paged_attention_reference` gathers each row's blocks into a contiguous [batch, max_blocks * block_size]
cache and runs the contiguous reference (kernels.decode_attention). `paged_attention` is a Pallas kernel:
the grid is (batch, kv_heads, splits); each program walks its share of the row's block table, gathers a
few blocks of K/V per step straight from the pool (no gathered copy in memory), and keeps an online softmax for the whole
group of query heads that share the kv head (GQA reads K/V once per group, never repeats them). Blocks
past the row's length (ragged lengths) and before its sliding window are never read. A small jnp epilogue
merges the splits by their log-sum-exp, as in the contiguous split-K kernel.

`chunk_attention_reference` is the multi-query form (a prefill chunk of queries against a gathered paged
cache), used by the paged prefill in llmjax.infer.paged. It materializes every score ([batch, heads, chunk,
capacity] float32: 128 MB a layer for a 512-token chunk over a 2048-token table). `chunk_attention_flash`
is the same function through the flash-attention kernel (kernels.flash_attention, online softmax: no score
in memory): each row's K/V are gathered token by token into a buffer laid out so that its chunk's queries sit
at the buffer's end, as the kernel's causal mask assumes, with the slots before the row's first token and
after its last masked by segment ids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .decode_attention import (
    NEG_INF,
    _pow2_at_least,
    attend_block,
    choose_splits,
    decode_attention_reference,
    merge_splits,
    run_split,
    split_compiler_params,
    split_outputs,
)


def gather_blocks(pool: jax.Array, block_tables: jax.Array) -> jax.Array:
    """pool [num_blocks, block_size, kv_heads, head_dim], block_tables [batch, max_blocks] ->
    each row's cache laid out contiguously [batch, max_blocks * block_size, kv_heads, head_dim]."""
    batch, max_blocks = block_tables.shape
    gathered = jnp.take(pool, block_tables, axis=0, mode="clip")  # [batch, max_blocks, block_size, kv, hd]
    return gathered.reshape(batch, max_blocks * pool.shape[1], *pool.shape[2:])


def paged_attention_reference(q, k_pool, v_pool, block_tables, lengths, *, sliding_window=None,
                              logit_softcap=None):
    """Gather the blocks, then plain softmax attention over the row's first `lengths` tokens (float32 scores)."""
    k = gather_blocks(k_pool, block_tables)
    v = gather_blocks(v_pool, block_tables)
    index = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]
    kv_positions = jnp.where(index < lengths[:, None], index, -1)  # a paged row holds position p at slot p
    return decode_attention_reference(q, k, v, kv_positions, lengths - 1, sliding_window=sliding_window,
                                      logit_softcap=logit_softcap)


def chunk_attention_reference(q, k, v, q_positions, kv_lengths, *, sliding_window=None, logit_softcap=None):
    """Causal attention of a chunk of queries over a gathered paged cache.

    q [batch, chunk, heads, head_dim] at positions q_positions [batch, chunk]; k, v [batch, capacity,
    kv_heads, head_dim] hold position p at slot p, the first kv_lengths [batch] of them written.
    Returns [batch, chunk, heads, head_dim]; a query that sees nothing gets zeros."""
    batch, chunk, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, chunk, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bckgd,btkd->bkgct", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    slot = jnp.arange(k.shape[1], dtype=jnp.int32)[None, None, :]  # [1, 1, capacity]
    qp = q_positions[:, :, None]  # [batch, chunk, 1]
    mask = (slot < kv_lengths[:, None, None]) & (slot <= qp)
    if sliding_window is not None:
        mask &= qp - slot < sliding_window
    mask = mask[:, None, None]  # [batch, 1, 1, chunk, capacity]
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jnp.exp(scores - scores.max(-1, keepdims=True)) * mask
    probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("bkgct,btkd->bckgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, chunk, heads, head_dim).astype(q.dtype)


def end_aligned_slots(block_tables, context_lengths, chunk_lengths, chunk: int, block_size: int):
    """Where each row's K/V go for end-aligned chunk attention: flat pool slots [batch, capacity + chunk]
    (capacity = max_blocks * block_size) such that buffer index j holds position j - (capacity -
    context_lengths[b]), so the chunk's query i (position context + i) sits at index capacity + i, i.e. end-
    aligned; and valid [batch, capacity + chunk]: the position is one of the row's tokens (0 <= p < context +
    chunk_length). Invalid slots point at slot 0 (read, then masked)."""
    batch, max_blocks = block_tables.shape
    capacity = max_blocks * block_size
    index = jnp.arange(capacity + chunk, dtype=jnp.int32)[None, :]
    positions = index - (capacity - context_lengths[:, None])  # [batch, capacity + chunk]
    valid = (positions >= 0) & (positions < (context_lengths + chunk_lengths)[:, None])
    block = jnp.take_along_axis(block_tables, jnp.clip(positions // block_size, 0, max_blocks - 1), axis=1)
    valid &= block >= 0
    return jnp.where(valid, block * block_size + positions % block_size, 0), valid


def chunk_attention_flash(q, k_pool, v_pool, block_tables, context_lengths, chunk_lengths, *, sliding_window=None,
                          logit_softcap=None, interpret: bool = False, block_sizes=None):
    """Causal attention of each row's prefill chunk over its paged cache, through the flash kernel.

    q [batch, chunk, heads, head_dim]: row b's queries at positions context_lengths[b] + i (i < chunk_lengths[b];
    the rest padding, their outputs unspecified but finite); k_pool, v_pool [num_blocks, block_size, kv_heads,
    head_dim] with the chunk's own K/V already written; block_tables [batch, max_blocks]. Equals
    `chunk_attention_reference` on the gathered blocks for every real query. Returns [batch, chunk, heads,
    head_dim]."""
    from .flash_attention import flash_attention

    batch, chunk = q.shape[:2]
    num_blocks, block_size = k_pool.shape[:2]
    slots, valid = end_aligned_slots(block_tables, context_lengths, chunk_lengths, chunk, block_size)
    flat = lambda pool: pool.reshape(num_blocks * block_size, *pool.shape[2:])  # noqa: E731
    k = jnp.take(flat(k_pool), slots, axis=0).astype(q.dtype)  # [batch, capacity + chunk, kv_heads, head_dim]
    v = jnp.take(flat(v_pool), slots, axis=0).astype(q.dtype)
    return flash_attention(q, k, v, causal=True, sliding_window=sliding_window,
                           q_segment_ids=jnp.ones((batch, chunk), jnp.int32), kv_segment_ids=valid.astype(jnp.int32),
                           logit_softcap=logit_softcap, interpret=interpret, block_sizes=block_sizes,
                           implementation="triton")


# --- the Pallas kernel -------------------------------------------------------------------------

def _kernel(table_ref, len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_size: int,
            blocks_per_split: int, blocks_per_step: int, sliding_window, logit_softcap, scale: float):
    split = pl.program_id(2)
    q = q_ref[...]  # [group_p, head_dim] in the compute dtype
    length = len_ref[()]
    q_pos = length - 1
    first = split * blocks_per_split  # this split's first entry of the row's block table
    used = jnp.clip((length + block_size - 1) // block_size - first, 0, blocks_per_split)  # its blocks in use
    start = 0
    if sliding_window is not None:  # steps wholly before the window are never read
        window_block = jnp.maximum(q_pos - sliding_window + 1, 0) // block_size
        start = jnp.clip(window_block - first, 0, blocks_per_split) // blocks_per_step
    stop = (used + blocks_per_step - 1) // blocks_per_step
    step_tokens = blocks_per_step * block_size

    def body(step, carry):
        blocks = table_ref[pl.ds(step * blocks_per_step, blocks_per_step)]  # pool blocks of this step
        k = k_ref[blocks].reshape(step_tokens, -1)  # [blocks_per_step * block_size, head_dim]
        v = v_ref[blocks].reshape(step_tokens, -1)
        token = (first + step * blocks_per_step) * block_size + jax.lax.broadcasted_iota(jnp.int32, (step_tokens,), 0)
        visible = token < length
        if sliding_window is not None:
            visible &= q_pos - token < sliding_window
        return attend_block(q, k, v, visible, carry, scale, logit_softcap)

    run_split(start, jnp.maximum(start, stop), body, q_ref, o_ref, m_ref, l_ref)


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "splits", "blocks_per_step",
                                             "interpret"))
def paged_attention(q, k_pool, v_pool, block_tables, lengths, *, sliding_window=None, logit_softcap=None,
                    splits: int | None = None, blocks_per_step: int | None = None, interpret: bool = False):
    """The Pallas paged-attention decode kernel; same contract as `paged_attention_reference`.

    blocks_per_step: blocks gathered per loop iteration (default: 64 tokens' worth), so that small blocks
    still make matmuls of a useful size. On a GPU (interpret=False) head_dim and blocks_per_step *
    block_size must be powers of two >= 16 (the tile shapes of the matmuls): the pool is read in place,
    never padded."""
    batch, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads = k_pool.shape[:3]
    max_blocks = block_tables.shape[1]
    group = heads // kv_heads
    if blocks_per_step is None:
        blocks_per_step = max(1, 64 // block_size)
    if splits is None:
        splits = choose_splits(batch, kv_heads, max_blocks * block_size, blocks_per_step * block_size)
    splits = max(1, min(splits, max_blocks))
    blocks_per_step = max(1, min(blocks_per_step, -(-max_blocks // splits)))
    blocks_per_split = -(-max_blocks // (splits * blocks_per_step)) * blocks_per_step  # whole steps
    if not interpret:
        for name, size in (("blocks_per_step * block_size", blocks_per_step * block_size), ("head_dim", head_dim)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"paged_attention on a GPU needs {name} a power of two >= 16, got {size}; "
                                 f"choose another block size, or use paged_attention_reference")
    group_p = _pow2_at_least(group, 16)  # tl.dot wants >= 16 rows: pad the group with zero queries
    # Entries past a row's blocks are junk: clamped into the pool, read only under a mask (or never).
    table = jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1)
    table = jnp.pad(table, ((0, 0), (0, splits * blocks_per_split - max_blocks)))
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_blocks * block_size)

    qg = q.reshape(batch, kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_p - group), (0, 0)))
    kernel = functools.partial(_kernel, block_size=block_size, blocks_per_split=blocks_per_split,
                               blocks_per_step=blocks_per_step, sliding_window=sliding_window, logit_softcap=logit_softcap, scale=head_dim**-0.5)
    table_spec = pl.BlockSpec((None, blocks_per_split), lambda b, h, s: (b, s))
    row_spec = pl.BlockSpec((None,), lambda b, h, s: (b,))
    q_spec = pl.BlockSpec((None, None, group_p, head_dim), lambda b, h, s: (b, h, 0, 0))
    pool_spec = pl.BlockSpec((num_blocks, block_size, None, head_dim), lambda b, h, s: (0, 0, h, 0))
    out_shape, out_specs = split_outputs(batch, kv_heads, splits, group_p, head_dim)
    out, row_max, row_sum = pl.pallas_call(
        kernel, grid=(batch, kv_heads, splits),
        in_specs=[table_spec, row_spec, q_spec, pool_spec, pool_spec], out_specs=out_specs, out_shape=out_shape,
        compiler_params=split_compiler_params(interpret), interpret=interpret, name="paged_attention",
    )(table, lengths, qg, k_pool, v_pool)
    merged = merge_splits(out, row_max, row_sum)[:, :, :group, :]
    return merged.reshape(batch, heads, head_dim).astype(q.dtype)
