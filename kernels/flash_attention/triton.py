"""FlashAttention-2 in Pallas with the Triton lowering: a forward kernel, a dK/dV kernel and a dQ kernel,
wired together with `jax.custom_vjp`.

Layout and masking are those of kernels.flash_attention.reference: q [batch, q_len, heads, head_dim];
k, v [batch, kv_len, kv_heads, head_dim]; query head h reads kv head h // (heads // kv_heads) (K/V are never
repeated in memory); query i sits at key position i + kv_len - q_len.

How it works (FlashAttention-2, arXiv 2307.08691):
- forward: one program per (query block, batch, head) walks the key blocks with an online softmax in float32
  (log2 domain: exp2 is one instruction) and writes out and lse [batch, heads, q_len], the natural-log
  sum-exp of the scaled, soft-capped, masked scores. Query blocks run heaviest first (causal balance).
- backward: delta = rowsum(dO * O) in XLA; a dK/dV program per (key block, batch, kv head) walks the query
  blocks of every query head of its group (GQA sums inside the kernel), and a dQ program per (query block,
  batch, head) walks the key blocks.
- each walk visits only blocks with a visible key (causal / sliding-window loop bounds) and builds the
  position mask only on the boundary blocks; segment ids are compared on every visited block.
- lengths that are not multiples of the block sizes are padded in the wrapper; padded keys are masked,
  padded queries are sliced off (and carry lse = +inf into the backward, so they contribute nothing).
  A head_dim that is not a power of two (Triton tiles are) is zero-padded; the scale uses the real one.

Fully masked query rows (no visible key: only with segment ids, or q_len > kv_len with causal) give a zero
output row, lse = -inf, and zero gradients; the reference gives a uniform average there instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import autotune
from .config import BlockSizes, KernelConfig, Masking

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MIN_BLOCK = 16  # the smallest tile dimension a tensor-core dot takes


# ----------------------------------------------------------------------------------------------------------
# Block ranges: which blocks hold a visible key, and which need no position mask. Pure integer arithmetic on
# Python ints or int32 scalars (the same code runs inside the kernels and in the tests).
# ----------------------------------------------------------------------------------------------------------


def _div(x, d: int):
    """floor(max(x, 0) / d)."""
    return lax.div(jnp.maximum(x, 0), d)


def _cdiv(x, d: int):
    """ceil(max(x, 0) / d)."""
    return lax.div(jnp.maximum(x, 0) + (d - 1), d)


def _ordered(lo, mid_lo, mid_hi, hi):
    """Clamp to lo <= mid_lo <= mid_hi <= hi."""
    lo = jnp.minimum(lo, hi)
    mid_lo = jnp.clip(mid_lo, lo, hi)
    mid_hi = jnp.clip(mid_hi, mid_lo, hi)
    return lo, mid_lo, mid_hi, hi


def kv_block_range(q_start, block_q: int, block_k: int, num_kv_blocks: int, masking: Masking):
    """Key blocks for the query block [q_start, q_start + block_q): every block with a visible key lies in
    [lo, hi); the blocks in [mid_lo, mid_hi) are visible to every query of the block (no position mask)."""
    first = q_start + masking.offset  # key position of the block's first query
    last = first + block_q - 1
    lo, hi = 0, num_kv_blocks
    mid_lo, mid_hi = 0, masking.kv_len // block_k  # a block holding padded keys is masked
    if masking.causal:
        hi = jnp.minimum(hi, _cdiv(last + 1, block_k))
        mid_hi = jnp.minimum(mid_hi, _div(first + 1, block_k))
    if masking.sliding_window is not None:
        lo = _div(first - masking.sliding_window + 1, block_k)
        mid_lo = _cdiv(last - masking.sliding_window + 1, block_k)
    return _ordered(lo, mid_lo, mid_hi, hi)


def q_block_range(k_start, block_q: int, block_k: int, num_q_blocks: int, masking: Masking):
    """Query blocks for the key block [k_start, k_start + block_k), as kv_block_range."""
    k_last = k_start + block_k - 1
    lo, hi = 0, num_q_blocks
    mid_lo, mid_hi = 0, num_q_blocks
    if masking.causal:
        lo = _div(k_start - masking.offset, block_q)  # first query at or after the block's first key
        mid_lo = _cdiv(k_last - masking.offset, block_q)  # first block whose queries all follow its last key
    if masking.sliding_window is not None:
        window = masking.sliding_window
        hi = jnp.minimum(hi, _cdiv(k_last + window - masking.offset, block_q))
        mid_hi = _div(k_start + window - masking.offset, block_q)
    if masking.kv_len % block_k:  # a block holding padded keys masks every query block: no unmasked range
        # Integer arithmetic rather than jnp.where: on the GPU, Pallas' Triton lowering of that select fed an
        # i1 into the clamp's arith.maxsi and the backward failed to compile for ragged lengths.
        holds_padding = jnp.asarray(k_start + block_k > masking.kv_len, jnp.int32)
        mid_hi = mid_hi * (1 - holds_padding)
    return _ordered(lo, mid_lo, mid_hi, hi)


# ----------------------------------------------------------------------------------------------------------
# Pieces shared by the kernels.
# ----------------------------------------------------------------------------------------------------------


def _dot(a, b):
    """a @ b in float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_t(a, b):
    """a @ b^T in float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(a, b, masking: Masking):
    """a @ b^T as base-2 logits (scaled, soft-capped) in float32, and the tanh the soft-cap backward needs."""
    raw = _dot_t(a, b)
    if masking.logit_softcap is None:
        return raw * (masking.scale * LOG2E), None
    tanh = jnp.tanh(raw * (masking.scale / masking.logit_softcap))
    return tanh * (masking.logit_softcap * LOG2E), tanh


def _visible(q_pos, k_pos, q_seg, k_seg, masking: Masking, *, check_positions: bool, check_kv_bound: bool):
    """Boolean mask (broadcast of the operands' shapes) of visible (query, key) pairs, or None for all."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if check_positions:
        if check_kv_bound:
            mask = both(mask, k_pos < masking.kv_len)
        if masking.causal:
            mask = both(mask, k_pos <= q_pos)
        if masking.sliding_window is not None:
            mask = both(mask, q_pos - k_pos < masking.sliding_window)
    if q_seg is not None:
        mask = both(mask, q_seg == k_seg)
    return mask


def _three_loops(ranges, step, carry):
    """Run step(index, carry, masked) over [lo, mid_lo) masked, [mid_lo, mid_hi) unmasked, [mid_hi, hi) masked."""
    lo, mid_lo, mid_hi, hi = ranges
    carry = lax.fori_loop(lo, mid_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(step, masked=False), carry)
    return lax.fori_loop(mid_hi, hi, functools.partial(step, masked=True), carry)


# ----------------------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, out_ref, lse_ref, *, masking: Masking,
                    block_q: int, block_k: int, num_q_blocks: int):
    """One query block of one head: online softmax over the visible key blocks.

    q_ref, out_ref [block_q, head_dim]; k_ref, v_ref [kv_len_padded, head_dim]; q_seg_ref [block_q];
    kv_seg_ref [kv_len_padded]; lse_ref [block_q] float32.
    """
    q_start = (num_q_blocks - 1 - pl.program_id(0)) * block_q  # heaviest (causal) blocks first
    q = q_ref[...]
    q_pos = (q_start + masking.offset + jnp.arange(block_q))[:, None]  # [block_q, 1]
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]
    kv_padded = k_ref.shape[0] != masking.kv_len

    def step(index, carry, masked):
        acc, row_max, row_sum = carry  # [block_q, head_dim], [block_q], [block_q]
        k_start = index * block_k
        keys = pl.ds(k_start, block_k)
        scores, _ = _scores(q, k_ref[keys, :], masking)  # [block_q, block_k]
        k_seg = None if q_seg is None else kv_seg_ref[keys][None, :]
        k_pos = (k_start + jnp.arange(block_k))[None, :]
        visible = _visible(q_pos, k_pos, q_seg, k_seg, masking, check_positions=masked, check_kv_bound=kv_padded)
        if visible is not None:
            scores = jnp.where(visible, scores, -jnp.inf)
        new_max = jnp.maximum(row_max, scores.max(axis=1))
        # A row with no visible key so far keeps max -inf; subtracting 0 instead keeps exp2 from NaN.
        shift = new_max if visible is None else jnp.where(new_max == -jnp.inf, 0.0, new_max)
        correction = jnp.exp2(row_max - shift)
        probs = jnp.exp2(scores - shift[:, None])
        row_sum = row_sum * correction + probs.sum(axis=1)
        v = v_ref[keys, :]
        acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v)
        return acc, new_max, row_sum

    head_dim = q_ref.shape[-1]
    carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    ranges = kv_block_range(q_start, block_q, block_k, k_ref.shape[0] // block_k, masking)
    acc, row_max, row_sum = _three_loops(ranges, step, carry)
    inverse_sum = 1.0 / jnp.where(row_sum == 0.0, 1.0, row_sum)  # fully masked rows: output 0
    plgpu.store(out_ref, (acc * inverse_sum[:, None]).astype(out_ref.dtype))
    plgpu.store(lse_ref, (row_max + jnp.log2(row_sum)) * LN2)  # -inf for fully masked rows


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref, *,
                masking: Masking, block_q: int, block_k: int):
    """One key block of one kv head: dK, dV summed over the visible query blocks of every query head in
    this program's share of the group.

    q_ref, do_ref [q_len_padded, heads_here, head_dim]; k_ref, v_ref, dk_ref, dv_ref [block_k, head_dim];
    lse_ref (natural log), delta_ref [heads_here, q_len_padded] float32; q_seg_ref [q_len_padded];
    kv_seg_ref [block_k].
    """
    k_start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]
    k_pos = (k_start + jnp.arange(block_k))[:, None]  # [block_k, 1]
    k_seg = None if kv_seg_ref is None else kv_seg_ref[...][:, None]
    kv_padded = masking.kv_len % block_k != 0
    q_len_padded, heads_here, head_dim = q_ref.shape

    def step(index, carry, head, masked):
        dk, dv = carry  # [block_k, head_dim] float32 each
        q_start = index * block_q
        queries = pl.ds(q_start, block_q)
        q = q_ref[queries, head, :]  # [block_q, head_dim]
        d_out = do_ref[queries, head, :]
        lse = lse_ref[head, queries] * LOG2E  # [block_q], base 2
        delta = delta_ref[head, queries]
        scores_t, tanh_t = _scores(k, q, masking)  # [block_k, block_q]
        probs_t = jnp.exp2(scores_t - lse[None, :])
        q_pos = (q_start + masking.offset + jnp.arange(block_q))[None, :]
        q_seg = None if k_seg is None else q_seg_ref[queries][None, :]
        visible = _visible(q_pos, k_pos, q_seg, k_seg, masking, check_positions=masked, check_kv_bound=kv_padded)
        if visible is not None:
            probs_t = jnp.where(visible, probs_t, 0.0)  # also clears rows with lse = -inf
        dv = dv + _dot(probs_t.astype(d_out.dtype), d_out)
        d_scores_t = probs_t * (_dot_t(v, d_out) - delta[None, :])  # [block_k, block_q]
        if tanh_t is not None:
            d_scores_t = d_scores_t * (1.0 - tanh_t * tanh_t)
        dk = dk + _dot(d_scores_t.astype(q.dtype), q)
        return dk, dv

    ranges = q_block_range(k_start, block_q, block_k, q_len_padded // block_q, masking)

    def one_head(head, carry):
        return _three_loops(ranges, functools.partial(step, head=head), carry)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    if heads_here == 1:
        dk, dv = one_head(0, (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, heads_here, one_head, (zeros, zeros))
    plgpu.store(dk_ref, (dk * masking.scale).astype(dk_ref.dtype))
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref, *,
               masking: Masking, block_q: int, block_k: int, num_q_blocks: int):
    """One query block of one head: dQ summed over the visible key blocks.

    q_ref, do_ref, dq_ref [block_q, head_dim]; k_ref, v_ref [kv_len_padded, head_dim];
    lse_ref, delta_ref [block_q] float32; q_seg_ref [block_q]; kv_seg_ref [kv_len_padded].
    """
    q_start = (num_q_blocks - 1 - pl.program_id(0)) * block_q
    q, d_out = q_ref[...], do_ref[...]
    lse = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    q_pos = (q_start + masking.offset + jnp.arange(block_q))[:, None]
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]
    kv_padded = k_ref.shape[0] != masking.kv_len

    def step(index, dq, masked):
        k_start = index * block_k
        keys = pl.ds(k_start, block_k)
        k = k_ref[keys, :]
        scores, tanh = _scores(q, k, masking)  # [block_q, block_k]
        probs = jnp.exp2(scores - lse[:, None])
        k_seg = None if q_seg is None else kv_seg_ref[keys][None, :]
        k_pos = (k_start + jnp.arange(block_k))[None, :]
        visible = _visible(q_pos, k_pos, q_seg, k_seg, masking, check_positions=masked, check_kv_bound=kv_padded)
        if visible is not None:
            probs = jnp.where(visible, probs, 0.0)
        d_scores = probs * (_dot_t(d_out, v_ref[keys, :]) - delta[:, None])
        if tanh is not None:
            d_scores = d_scores * (1.0 - tanh * tanh)
        return dq + _dot(d_scores.astype(k.dtype), k)

    ranges = kv_block_range(q_start, block_q, block_k, k_ref.shape[0] // block_k, masking)
    dq = _three_loops(ranges, step, jnp.zeros(q.shape, jnp.float32))
    plgpu.store(dq_ref, (dq * masking.scale).astype(dq_ref.dtype))


# ----------------------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded: lengths multiples of the blocks, head_dim a power of two).
# ----------------------------------------------------------------------------------------------------------


def _compiler_params(config: KernelConfig):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _segment_specs(q_seg, q_block_spec, kv_seg, kv_block_spec):
    return (None if q_seg is None else q_block_spec), (None if kv_seg is None else kv_block_spec)


def _query_major_specs(q, k, q_seg, kv_seg, config: KernelConfig):
    """Specs of a grid (query block, batch, head) whose programs read one query block and every key:
    heaviest query blocks first (under a causal mask the last blocks see the most keys).
    -> (num_q_blocks, q_block index map, q_spec, kv_spec, q_seg_spec, kv_seg_spec)."""
    q_len_p, head_dim = q.shape[1], q.shape[3]
    kv_len_p = k.shape[1]
    group = q.shape[2] // k.shape[2]
    block_q = config.block_q
    num_q_blocks = q_len_p // block_q

    def q_block(i):
        return num_q_blocks - 1 - i

    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, q_block(i), h, 0))
    kv_spec = pl.BlockSpec((None, kv_len_p, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    q_seg_spec, kv_seg_spec = _segment_specs(
        q_seg, pl.BlockSpec((None, block_q), lambda i, b, h: (b, q_block(i))),
        kv_seg, pl.BlockSpec((None, kv_len_p), lambda i, b, h: (b, 0)))
    return num_q_blocks, q_block, q_spec, kv_spec, q_seg_spec, kv_seg_spec


def _forward_call(q, k, v, q_seg, kv_seg, masking: Masking, config: KernelConfig, interpret: bool):
    """-> out [batch, q_len_p, heads, head_dim], lse [batch, heads, q_len_p] float32."""
    batch, q_len_p, heads, head_dim = q.shape
    block_q, block_k = config.block_q, config.block_k
    num_q_blocks, q_block, q_spec, kv_spec, q_seg_spec, kv_seg_spec = _query_major_specs(q, k, q_seg, kv_seg, config)
    kernel = functools.partial(_forward_kernel, masking=masking, block_q=block_q, block_k=block_k,
                               num_q_blocks=num_q_blocks)
    return pl.pallas_call(
        kernel,
        grid=(num_q_blocks, batch, heads),
        in_specs=[q_spec, kv_spec, kv_spec, q_seg_spec, kv_seg_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_len_p), jnp.float32)],
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="flash_attention_forward",
    )(q, k, v, q_seg, kv_seg)


def dkv_group_split(batch: int, kv_heads: int, group: int, num_k_blocks: int, target_programs: int = 264) -> int:
    """How many programs share one kv head's query-head group in the dK/dV kernel: 1 (sum in the kernel)
    unless that leaves fewer than `target_programs` (two waves on a 132-SM H100) programs; then the largest
    needed divisor of the group, and the partial sums are added in float32 afterwards."""
    programs = batch * kv_heads * num_k_blocks
    split = 1
    for divisor in range(1, group + 1):
        if group % divisor == 0:
            split = divisor
            if programs * divisor >= target_programs:
                break
    return split


def _dkv_call(q, k, v, d_out, lse, delta, q_seg, kv_seg, masking: Masking, config: KernelConfig, split: int,
              interpret: bool):
    """-> dk, dv [batch, kv_len_p, kv_heads, head_dim] (k.dtype), summed over each kv head's group."""
    batch, q_len_p, heads, head_dim = q.shape
    kv_len_p, kv_heads = k.shape[1], k.shape[2]
    heads_here = heads // kv_heads // split
    block_q, block_k = config.block_q, config.block_k

    # Grid axis 2 runs over (kv head, share of its group); share s of kv head g holds query heads
    # [g * group + s * heads_here, ...), i.e. block index g * split + s of size heads_here along heads.
    q_spec = pl.BlockSpec((None, q_len_p, heads_here, head_dim), lambda j, b, gs: (b, 0, gs, 0))
    kv_spec = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, gs: (b, j, gs // split, 0))
    row_spec = pl.BlockSpec((None, heads_here, q_len_p), lambda j, b, gs: (b, gs, 0))
    q_seg_spec, kv_seg_spec = _segment_specs(
        q_seg, pl.BlockSpec((None, q_len_p), lambda j, b, gs: (b, 0)),
        kv_seg, pl.BlockSpec((None, block_k), lambda j, b, gs: (b, j)))
    if split == 1:
        out_spec = kv_spec
        out_shape = jax.ShapeDtypeStruct(k.shape, k.dtype)
    else:  # float32 partial sums, one per share, added below
        out_spec = pl.BlockSpec((None, None, block_k, None, head_dim),
                                lambda j, b, gs: (gs % split, b, j, gs // split, 0))
        out_shape = jax.ShapeDtypeStruct((split, *k.shape), jnp.float32)
    kernel = functools.partial(_dkv_kernel, masking=masking, block_q=block_q, block_k=block_k)
    dk, dv = pl.pallas_call(
        kernel,
        grid=(kv_len_p // block_k, batch, kv_heads * split),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, q_seg_spec, kv_seg_spec],
        out_specs=[out_spec, out_spec],
        out_shape=[out_shape, out_shape],
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="flash_attention_dkv",
    )(q, k, v, d_out, lse, delta, q_seg, kv_seg)
    if split > 1:
        dk, dv = dk.sum(axis=0).astype(k.dtype), dv.sum(axis=0).astype(v.dtype)
    return dk, dv


def _dq_call(q, k, v, d_out, lse, delta, q_seg, kv_seg, masking: Masking, config: KernelConfig,
             interpret: bool):
    """-> dq [batch, q_len_p, heads, head_dim] (q.dtype)."""
    batch, q_len_p, heads, head_dim = q.shape
    block_q, block_k = config.block_q, config.block_k
    num_q_blocks, q_block, q_spec, kv_spec, q_seg_spec, kv_seg_spec = _query_major_specs(q, k, q_seg, kv_seg, config)
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i)))
    kernel = functools.partial(_dq_kernel, masking=masking, block_q=block_q, block_k=block_k,
                               num_q_blocks=num_q_blocks)
    return pl.pallas_call(
        kernel,
        grid=(num_q_blocks, batch, heads),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, q_seg_spec, kv_seg_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="flash_attention_dq",
    )(q, k, v, d_out, lse, delta, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------------------------
# Padding and block choice.
# ----------------------------------------------------------------------------------------------------------


def fit_config(config: KernelConfig, q_len: int, kv_len: int) -> KernelConfig:
    """Shrink blocks that exceed the (power-of-two rounded) sequence lengths."""
    return dataclasses.replace(
        config,
        block_q=min(config.block_q, max(MIN_BLOCK, pl.next_power_of_2(q_len))),
        block_k=min(config.block_k, max(MIN_BLOCK, pl.next_power_of_2(kv_len))),
    )


def _pad_axis(x, axis: int, size: int, value=0):
    """Pad axis `axis` of x at the end to `size` with `value` (no copy when already that size)."""
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_head_dim(head_dim: int) -> int:
    return pl.next_power_of_2(max(head_dim, MIN_BLOCK))


def _segments(q_segment_ids, kv_segment_ids):
    """int32 segment ids (kv defaults to q, for self-attention), or (None, None)."""
    if q_segment_ids is None:
        return None, None
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    return q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)


def make_masking(q, k, *, causal, sliding_window, logit_softcap) -> Masking:
    return Masking(causal=bool(causal), sliding_window=None if sliding_window is None else int(sliding_window),
                   logit_softcap=None if logit_softcap is None else float(logit_softcap),
                   q_len=q.shape[1], kv_len=k.shape[1], scale=q.shape[-1] ** -0.5)


def _resolve(block_sizes: BlockSizes | None, which: str, q, k, masking: Masking, interpret: bool) -> KernelConfig:
    """The config of kernel `which` ("forward", "dkv", "dq"): from block_sizes, else the autotuner."""
    config = None if block_sizes is None else getattr(block_sizes, which)
    if config is None:
        config = autotune.config_for(which, q, k, masking, interpret=interpret, time_candidate=time_candidate)
    return fit_config(config, masking.q_len, masking.kv_len)


# ----------------------------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("masking", "config", "interpret"))
def _forward(q, k, v, q_seg, kv_seg, *, masking: Masking, config: KernelConfig, interpret: bool):
    head_dim_p = _padded_head_dim(q.shape[-1])
    q_len_p = _round_up(masking.q_len, config.block_q)
    kv_len_p = _round_up(masking.kv_len, config.block_k)
    q_p = _pad_axis(_pad_axis(q, 3, head_dim_p), 1, q_len_p)
    k_p = _pad_axis(_pad_axis(k, 3, head_dim_p), 1, kv_len_p)
    v_p = _pad_axis(_pad_axis(v, 3, head_dim_p), 1, kv_len_p)
    q_seg_p, kv_seg_p = _pad_axis(q_seg, 1, q_len_p, -1), _pad_axis(kv_seg, 1, kv_len_p, -1)
    out, lse = _forward_call(q_p, k_p, v_p, q_seg_p, kv_seg_p, masking, config, interpret)
    return out[:, :masking.q_len, :, :q.shape[-1]], lse[:, :, :masking.q_len]


@functools.partial(jax.jit, static_argnames=("masking", "dkv_config", "dq_config", "interpret"))
def _backward(q, k, v, out, lse, d_out, q_seg, kv_seg, *, masking: Masking, dkv_config: KernelConfig,
              dq_config: KernelConfig, interpret: bool):
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [b, h, s]
    head_dim_p = _padded_head_dim(q.shape[-1])
    q_len_p = _round_up(masking.q_len, max(dkv_config.block_q, dq_config.block_q))
    kv_len_p = _round_up(masking.kv_len, max(dkv_config.block_k, dq_config.block_k))
    q_p = _pad_axis(_pad_axis(q, 3, head_dim_p), 1, q_len_p)
    d_out_p = _pad_axis(_pad_axis(d_out.astype(q.dtype), 3, head_dim_p), 1, q_len_p)
    k_p = _pad_axis(_pad_axis(k, 3, head_dim_p), 1, kv_len_p)
    v_p = _pad_axis(_pad_axis(v, 3, head_dim_p), 1, kv_len_p)
    lse_p = _pad_axis(lse.astype(jnp.float32), 2, q_len_p, jnp.inf)  # padded queries: probabilities 0
    delta_p = _pad_axis(delta, 2, q_len_p)
    q_seg_p, kv_seg_p = _pad_axis(q_seg, 1, q_len_p, -1), _pad_axis(kv_seg, 1, kv_len_p, -1)
    batch, _, heads, _ = q.shape
    kv_heads = k.shape[2]
    split = dkv_group_split(batch, kv_heads, heads // kv_heads, kv_len_p // dkv_config.block_k)
    dk, dv = _dkv_call(q_p, k_p, v_p, d_out_p, lse_p, delta_p, q_seg_p, kv_seg_p, masking, dkv_config, split,
                       interpret)
    dq = _dq_call(q_p, k_p, v_p, d_out_p, lse_p, delta_p, q_seg_p, kv_seg_p, masking, dq_config, interpret)
    head_dim = q.shape[-1]  # [b, len, heads, head_dim]: padding sliced off
    return (dq[:, :masking.q_len, :, :head_dim], dk[:, :masking.kv_len, :, :head_dim],
            dv[:, :masking.kv_len, :, :head_dim])


def flash_attention_forward_triton(q, k, v, *, causal=True, sliding_window=None, q_segment_ids=None,
                                   kv_segment_ids=None, logit_softcap=None, block_sizes: BlockSizes | None = None,
                                   interpret: bool = False):
    """Attention forward -> (out [batch, q_len, heads, head_dim] in q.dtype, lse [batch, heads, q_len] float32,
    natural log). Inputs are not validated here (kernels.flash_attention.flash_attention does that)."""
    masking = make_masking(q, k, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap)
    config = _resolve(block_sizes, "forward", q, k, masking, interpret)
    q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids)
    return _forward(q, k, v, q_seg, kv_seg, masking=masking, config=config, interpret=interpret)


def flash_attention_backward_triton(q, k, v, out, lse, d_out, *, causal=True, sliding_window=None,
                                    q_segment_ids=None, kv_segment_ids=None, logit_softcap=None,
                                    block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Attention backward from the forward's (out, lse [batch, heads, q_len] float32 natural log) and the
    output cotangent d_out -> (dq, dk, dv) in the dtypes of q, k, v. Any forward that writes that lse works
    (the Hopper kernel reuses this); rows whose lse is -inf (no visible key) get zero gradients."""
    masking = make_masking(q, k, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap)
    dkv_config = _resolve(block_sizes, "dkv", q, k, masking, interpret)
    dq_config = _resolve(block_sizes, "dq", q, k, masking, interpret)
    q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids)
    return _backward(q, k, v, out, lse, d_out, q_seg, kv_seg, masking=masking, dkv_config=dkv_config,
                     dq_config=dq_config, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, q_seg, kv_seg, options, block_sizes):
    return _attention_forward(q, k, v, q_seg, kv_seg, options, block_sizes)[0]


def _attention_forward(q, k, v, q_seg, kv_seg, options, block_sizes):
    out, lse = flash_attention_forward_triton(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                              block_sizes=block_sizes, **dict(options))
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _attention_backward(options, block_sizes, residuals, d_out):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    dq, dk, dv = flash_attention_backward_triton(q, k, v, out, lse, d_out, q_segment_ids=q_seg,
                                                 kv_segment_ids=kv_seg, block_sizes=block_sizes, **dict(options))
    return dq, dk, dv, None, None


_attention.defvjp(_attention_forward, _attention_backward)


def flash_attention_triton(q, k, v, *, causal=True, sliding_window=None, q_segment_ids=None, kv_segment_ids=None,
                           logit_softcap=None, block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Differentiable flash attention -> [batch, q_len, heads, head_dim]. block_sizes None: autotuned per
    shape class (fixed small blocks in interpret mode)."""
    q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids)
    options = (("causal", bool(causal)), ("sliding_window", sliding_window), ("logit_softcap", logit_softcap),
               ("interpret", bool(interpret)))
    return _attention(q, k, v, q_seg, kv_seg, options, block_sizes)


# ----------------------------------------------------------------------------------------------------------
# Timing for the autotuner (autotune.py chooses; these kernels are what it times).
# ----------------------------------------------------------------------------------------------------------


def _masking_kwargs(masking: Masking) -> dict:
    return dict(causal=masking.causal, sliding_window=masking.sliding_window, logit_softcap=masking.logit_softcap)


def time_candidate(which: str, config: KernelConfig, q, k, masking: Masking,
                   forward: KernelConfig | None = None) -> float:
    """Seconds per call of kernel `which` with `config`; the backward kernels are timed together with the
    other backward kernel at its default, on the output of the forward with config `forward`."""
    kwargs = _masking_kwargs(masking)
    q_in, k_in, v_in, d_out = autotune.tuning_inputs(q, k, masking)
    if which == "forward":
        fn = jax.jit(functools.partial(flash_attention_forward_triton, block_sizes=BlockSizes(config), **kwargs))
        return autotune.median_seconds(fn, q_in, k_in, v_in)
    out, lse = jax.jit(functools.partial(flash_attention_forward_triton, block_sizes=BlockSizes(forward),
                                         **kwargs))(q_in, k_in, v_in)
    other = "dq" if which == "dkv" else "dkv"
    block_sizes = BlockSizes(forward, **{which: config, other: autotune.candidates(other, q.shape[-1], q.dtype)[0]})
    fn = jax.jit(functools.partial(flash_attention_backward_triton, block_sizes=block_sizes, **kwargs))
    return autotune.median_seconds(fn, q_in, k_in, v_in, out, lse, d_out)
