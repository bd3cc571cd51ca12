"""Decode attention over a KV cache: one new query per row against every cached key.

Shapes: q [batch, heads, head_dim]; k, v [batch, capacity, kv_heads, head_dim] (bf16 / f32, or int8
with k_scale, v_scale [batch, capacity, kv_heads]); kv_positions [batch, capacity] (the position each
slot holds, -1 for none); q_positions [batch]. A slot is visible iff 0 <= its position <= the query's
and, with a sliding window w, query - position < w. Query head h reads kv head h // (heads // kv_heads).

`decode_attention_reference` is plain jax.numpy. `decode_attention` is a split-K ("flash decoding")
Pallas kernel: the grid is (batch, kv_heads, splits); each program walks its share of the cache in
blocks with an online softmax for the whole group of query heads that share the kv head (so K/V are
read once per group, GQA never repeats them), dequantizes int8 blocks in registers, and skips the
blocks past the row's last used slot (`kv_lengths`). A small jnp epilogue merges the splits by their
log-sum-exp. At batch 1 a decode step has only kv_heads programs without the split; splitting the
cache over ~2 waves of SMs is what makes a memory-bound step use the whole GPU's bandwidth.

Several queries per cache row (`queries_per_row` n: speculative decoding's verification scores n positions
at once): q [batch * n, heads, head_dim], q_positions and kv_lengths [batch * n], query r reads cache row
r // n. Each query is computed exactly as a one-query call at its own position and length would compute it
(same programs, same split layout: the splits follow the cache's rows, not the queries), and the merge adds
the splits in a fixed order, one after the other (trailing empty splits add exact zeros): a query's output
is the same bits whatever else shares the call, and whether the cache has more (unused) splits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG_INF = -1e30  # finite: a fully masked block must not produce NaNs in the online softmax


def _dequantized(x, scale, dtype):
    if scale is None:
        return x.astype(dtype)
    return (x.astype(jnp.float32) * scale[..., None]).astype(dtype)


def decode_attention_reference(q, k, v, kv_positions, q_positions, *, sliding_window=None, k_scale=None,
                               v_scale=None, logit_softcap=None, queries_per_row: int = 1):
    """softmax(q k^T / sqrt(d)) v over the visible slots -> [batch * n, heads, head_dim] (scores in float32),
    n = queries_per_row (q, q_positions: [batch * n, ...], query r against cache row r // n).
    A query with no visible slot gets zeros."""
    rows, heads, head_dim = q.shape
    batch, kv_heads = k.shape[0], k.shape[2]
    check_queries(rows, batch, queries_per_row)
    n = queries_per_row
    k = _dequantized(k, k_scale, q.dtype)
    v = _dequantized(v, v_scale, q.dtype)
    qg = q.reshape(batch, n, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bnkgd,btkd->bnkgt", qg, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    q_at = q_positions.reshape(batch, n, 1)
    mask = (kv_positions[:, None, :] >= 0) & (kv_positions[:, None, :] <= q_at)  # [batch, n, capacity]
    if sliding_window is not None:
        mask &= q_at - kv_positions[:, None, :] < sliding_window
    mask = mask[:, :, None, None, :]  # [batch, n, 1, 1, capacity]
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jnp.exp(scores - scores.max(-1, keepdims=True)) * mask
    probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("bnkgt,btkd->bnkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(rows, heads, head_dim).astype(q.dtype)


def check_queries(rows: int, batch: int, queries_per_row: int) -> None:
    if queries_per_row < 1 or rows != batch * queries_per_row:
        raise ValueError(f"decode attention: {rows} queries for {batch} cache rows with queries_per_row="
                         f"{queries_per_row}; q needs cache rows x queries_per_row rows (queries_per_row >= 1)")


# --- the Pallas kernel -------------------------------------------------------------------------

def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _kernel(q_ref, k_ref, v_ref, pos_ref, qpos_ref, len_ref, *rest, block_k: int, split_len: int,
            sliding_window, logit_softcap, quantized: bool, scale: float):
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = rest
    else:
        o_ref, m_ref, l_ref = rest
    split = pl.program_id(2)
    q = q_ref[...]  # [group_p, head_dim] in the compute dtype
    q_pos = qpos_ref[()]
    start = split * split_len
    used = jnp.clip(len_ref[()] - start, 0, split_len)  # slots of this split that hold anything
    num_blocks = (used + block_k - 1) // block_k

    def body(index, carry):
        window = pl.ds(index * block_k, block_k)
        k = k_ref[window, :]  # [block_k, head_dim]
        v = v_ref[window, :]
        if quantized:  # dequantize in registers: the int8 block is what crossed the memory bus
            k = (k.astype(jnp.float32) * ks_ref[window][:, None]).astype(q.dtype)
            v = (v.astype(jnp.float32) * vs_ref[window][:, None]).astype(q.dtype)
        positions = pos_ref[window]  # [block_k]
        visible = (positions >= 0) & (positions <= q_pos)
        if sliding_window is not None:
            visible &= q_pos - positions < sliding_window
        return attend_block(q, k, v, visible, carry, scale, logit_softcap)

    run_split(0, num_blocks, body, q_ref, o_ref, m_ref, l_ref)


def attend_block(q, k, v, visible, carry, scale: float, logit_softcap):
    """One online-softmax step of a split: q [group_p, head_dim] against k, v [n, head_dim] where visible [n];
    carry (out [group_p, head_dim], row_max [group_p], row_sum [group_p]) float32."""
    out, row_max, row_sum = carry
    scores = _dot(q, k, ((1,), (1,))) * scale  # [group_p, n] float32
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    scores = jnp.where(visible[None, :], scores, NEG_INF)
    new_max = jnp.maximum(row_max, scores.max(axis=-1))
    correction = jnp.exp(row_max - new_max)
    probs = jnp.where(visible[None, :], jnp.exp(scores - new_max[:, None]), 0.0)
    out = out * correction[:, None] + _dot(probs.astype(v.dtype), v, ((1,), (0,)))
    return out, new_max, row_sum * correction + probs.sum(axis=-1)


def run_split(start, stop, body, q_ref, o_ref, m_ref, l_ref) -> None:
    """fori_loop(start, stop, body) from an empty online softmax; writes the split's unnormalized output and
    its row max / sum (merge_splits combines the splits)."""
    group_p, head_dim = q_ref.shape
    init = (jnp.zeros((group_p, head_dim), jnp.float32), jnp.full((group_p,), NEG_INF, jnp.float32),
            jnp.zeros((group_p,), jnp.float32))
    out, row_max, row_sum = jax.lax.fori_loop(start, stop, body, init)
    o_ref[...] = out
    m_ref[...] = row_max
    l_ref[...] = row_sum


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def choose_splits(batch: int, kv_heads: int, capacity: int, block_k: int, target_programs: int = 264) -> int:
    """Splits of the cache so that batch * kv_heads * splits fills about two waves of SMs; a divisor of
    the number of blocks when one is near, so that the cache needs no padding (a copy)."""
    blocks = max(1, -(-capacity // block_k))
    target = max(1, min(blocks, target_programs // max(1, batch * kv_heads)))
    divisors = [d for d in range(1, target + 1) if blocks % d == 0]
    return divisors[-1] if divisors[-1] * 2 > target else target


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "block_k", "splits", "interpret",
                                             "queries_per_row"))
def decode_attention(q, k, v, kv_positions, q_positions, kv_lengths=None, *, sliding_window=None, k_scale=None,
                     v_scale=None, logit_softcap=None, block_k: int = 64, splits: int | None = None,
                     interpret: bool = False, queries_per_row: int = 1):
    """The split-K Pallas kernel; same contract as `decode_attention_reference`.

    kv_lengths [batch * queries_per_row]: slots past this are never read by that query (default: the whole
    capacity). splits: default `choose_splits` for the cache's rows (k.shape[0]), whatever queries_per_row."""
    rows, heads, head_dim = q.shape
    batch, capacity, kv_heads = k.shape[:3]
    check_queries(rows, batch, queries_per_row)
    group = heads // kv_heads
    group_p = _pow2_at_least(group, 16)  # tl.dot wants >= 16 rows: pad the group with zero queries
    head_dim_p = _pow2_at_least(head_dim, 16)
    block_k = min(block_k, _pow2_at_least(capacity, 16))
    if splits is None:
        splits = choose_splits(batch, kv_heads, capacity, block_k)
    split_len = pl.cdiv(pl.cdiv(capacity, splits), block_k) * block_k
    capacity_p = split_len * splits
    quantized = k_scale is not None
    if kv_lengths is None:
        kv_lengths = jnp.full((rows,), capacity, jnp.int32)
    kv_lengths = jnp.minimum(kv_lengths.astype(jnp.int32), capacity)

    qg = q.reshape(rows, kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_p - group), (0, head_dim_p - head_dim)))
    pad_t = capacity_p - capacity
    if pad_t or head_dim_p != head_dim:
        k = jnp.pad(k, ((0, 0), (0, pad_t), (0, 0), (0, head_dim_p - head_dim)))
        v = jnp.pad(v, ((0, 0), (0, pad_t), (0, 0), (0, head_dim_p - head_dim)))
    if pad_t:
        kv_positions = jnp.pad(kv_positions, ((0, 0), (0, pad_t)), constant_values=-1)
        if quantized:
            k_scale = jnp.pad(k_scale, ((0, 0), (0, pad_t), (0, 0)))
            v_scale = jnp.pad(v_scale, ((0, 0), (0, pad_t), (0, 0)))

    kernel = functools.partial(_kernel, block_k=block_k, split_len=split_len, sliding_window=sliding_window,
                               logit_softcap=logit_softcap, quantized=quantized, scale=head_dim**-0.5)
    cache_row = lambda r: jax.lax.div(r, queries_per_row)  # noqa: E731  (query r reads cache row r // n)
    q_spec = pl.BlockSpec((None, None, group_p, head_dim_p), lambda r, h, s: (r, h, 0, 0))
    kv_spec = pl.BlockSpec((None, split_len, None, head_dim_p), lambda r, h, s: (cache_row(r), s, h, 0))
    pos_spec = pl.BlockSpec((None, split_len), lambda r, h, s: (cache_row(r), s))
    row_spec = pl.BlockSpec((None,), lambda r, h, s: (r,))
    in_specs = [q_spec, kv_spec, kv_spec, pos_spec, row_spec, row_spec]
    inputs = [qg, k, v, kv_positions.astype(jnp.int32), q_positions.astype(jnp.int32), kv_lengths]
    if quantized:
        scale_spec = pl.BlockSpec((None, split_len, None), lambda r, h, s: (cache_row(r), s, h))
        in_specs += [scale_spec, scale_spec]
        inputs += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    out_shape, out_specs = split_outputs(rows, kv_heads, splits, group_p, head_dim_p)
    out, row_max, row_sum = pl.pallas_call(
        kernel, grid=(rows, kv_heads, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=split_compiler_params(interpret), interpret=interpret, name="decode_attention",
    )(*inputs)
    merged = merge_splits(out, row_max, row_sum)[:, :, :group, :head_dim]
    return merged.reshape(rows, heads, head_dim).astype(q.dtype)


def split_outputs(batch: int, kv_heads: int, splits: int, group_p: int, head_dim: int):
    """(out_shape, out_specs) of a split-K decode kernel on a (batch, kv_heads, splits) grid: each program's
    unnormalized output [group_p, head_dim] and its rows' running max and sum [group_p], float32."""
    out_shape = [
        jax.ShapeDtypeStruct((batch, kv_heads, splits, group_p, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, splits, group_p), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, splits, group_p), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, group_p, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
        pl.BlockSpec((None, None, None, group_p), lambda b, h, s: (b, h, s, 0)),
        pl.BlockSpec((None, None, None, group_p), lambda b, h, s: (b, h, s, 0)),
    ]
    return out_shape, out_specs


def split_compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=2)


ORDERED_MERGE_MAX_SPLITS = 64  # up to this many splits the merge adds them one by one (an unrolled chain)


def merge_splits(out, row_max, row_sum):
    """[batch, kv_heads, group_p, head_dim]: out = sum_s exp(m_s - m) o_s / sum_s exp(m_s - m) l_s
    (empty splits weigh nothing).

    The sums run over s = 0, 1, 2, ... in that order (elementwise adds, for up to ORDERED_MERGE_MAX_SPLITS
    splits): a row's result does not depend on the batch size, unlike a reduction whose order the compiler
    picks per shape, and trailing empty splits add exact zeros. The max is exact in any order."""
    overall = row_max.max(axis=2, keepdims=True)
    weight = jnp.exp(row_max - overall)  # [batch, kv_heads, splits, group_p]
    splits = out.shape[2]
    if splits > ORDERED_MERGE_MAX_SPLITS:
        total, weighted = (row_sum * weight).sum(axis=2), (out * weight[..., None]).sum(axis=2)
    else:
        total, weighted = row_sum[:, :, 0] * weight[:, :, 0], out[:, :, 0] * weight[:, :, 0, :, None]
        for s in range(1, splits):
            total = total + row_sum[:, :, s] * weight[:, :, s]
            weighted = weighted + out[:, :, s] * weight[:, :, s, :, None]
    return weighted / jnp.maximum(total, 1e-30)[..., None]
