"""FlashAttention backward for Hopper (H100 / H200) in Pallas Mosaic GPU, FlashAttention-3 style.

One fused kernel computes dQ, dK and dV. A CTA owns 2 * 64 key rows of one (batch, kv head) and walks the
query blocks (64 rows) of every query head of its GQA group that see any of its keys:

- a producer warpgroup streams Q, dO and the per-row statistics (lse in log2 units, delta = rowsum(dO * O))
  of each query block into a ring of `num_stages` shared-memory slots with TMA;
- two consumer warpgroups, 64 key rows each, keep their K / V rows in shared memory and dK / dV in registers.
  Per query block a consumer computes S^T = K Q^T and dP^T = V dO^T (wgmma, keys as the M dimension: the
  row statistics broadcast along the columns), P^T = exp2(S^T - lse), dS^T = P^T (dP^T - delta), then
  dV += P^T dO and dK += dS^T Q with P^T / dS^T as register operands;
- dQ of the block is dS K. dS^T goes to shared memory and is read back transposed by a wgmma. With
  `dq_split="columns"` (head_dim 128) the two consumers meet once per block and each multiplies the whole
  128-key dS by its half of K's columns (one 64 x 64 float32 partial per consumer, FlashAttention-3's split);
  with "rows" each multiplies its own 64 keys by all of K (no meeting, twice the partial bytes). The partial
  goes back to a float32 dQ accumulator in global memory with a TMA reduce-add (`cp.reduce.async.bulk`);
  the wrapper scales it and casts it to q's dtype.

Causal and sliding-window masks cost nothing on fully visible blocks: the query range splits into masked
edges and an unmasked middle, and blocks no query of the CTA can see are skipped. Scores are in log2 units
(the softmax scale and log2(e) fold into one multiply); the softmax scale of dQ and dK is applied once at the end.

Shapes as kernels.flash_attention.mosaic_gpu: q, out, d_out [batch, q_len, heads, head_dim]; k, v
[batch, kv_len, kv_heads, head_dim]; lse [batch, heads, q_len] float32 (natural log, from the forward).
Supported (`backward_supported` says why not): bf16 / f16, head_dim 64 and 128, q_len a multiple of 64,
kv_len of 128, causal or not, GQA / MQA, sliding window, logit soft-capping, q_len <= kv_len when masked.
Interpret mode (CPUs) stages P^T and dS^T through shared memory (the interpreter's wgmma takes A from shared
memory only) and writes each CTA's dQ partials to their own slice of a buffer summed afterwards (it has no
TMA reduction): the rest of the kernel, barriers included, is the one the GPU runs.

Speed against cuDNN and the Triton backward, and the two schedules tried and dropped (commit faccb9f: dK / dV
products left running across the next block, "deferred"; dQ one step late so the consumers never meet,
"decoupled"): docs/perf.md, "Hopper backward (Mosaic GPU), H200". The tests check the gradients against the
float32 reference (masks, GQA / MQA, head_dim 64, q_len < kv_len, soft-cap).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .validate import mosaic_unsupported_operands

LOG2E = math.log2(math.e)
NUM_CONSUMERS = 2  # compute warpgroups per CTA; the producer is warpgroup NUM_CONSUMERS
BLOCK_Q = 64  # query rows per step: the N of S^T = K Q^T and the K of dV = P^T dO
BLOCK_KV = 64  # key rows per consumer (one wgmma M tile); a CTA owns NUM_CONSUMERS * BLOCK_KV keys
ROWS_PER_CTA = NUM_CONSUMERS * BLOCK_KV


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Schedule of the backward kernel (the tile sizes are fixed by the wgmma shapes above)."""

    num_stages: int = 2  # Q / dO ring depth
    dq_split: str = "columns"  # "columns" (head_dim 128 only) or "rows": see the module docstring
    consumer_registers: int = 240
    producer_registers: int = 24

    def __post_init__(self):
        if self.dq_split not in ("columns", "rows"):
            raise ValueError(f"dq_split must be 'columns' or 'rows', got {self.dq_split!r}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")

    @property
    def ds_buffers(self) -> int:
        """dS^T buffers: columns, two (the other consumer may still read the last one); rows, one."""
        return 2 if self.dq_split == "columns" else 1


def default_backward_config(head_dim: int) -> BackwardConfig:
    return BackwardConfig(dq_split="columns" if head_dim == 128 else "rows")


SHARED_MEMORY_BYTES = 227 * 1024  # per CTA on Hopper


def shared_memory_bytes(head_dim: int, itemsize: int, config: BackwardConfig) -> int:
    """The kernel's shared-memory scratch (barriers aside)."""
    columns = config.dq_split == "columns"
    dq_cols = head_dim // NUM_CONSUMERS if columns else head_dim
    return (2 * ROWS_PER_CTA * head_dim * itemsize  # K, V
            + config.num_stages * (2 * BLOCK_Q * head_dim * itemsize + 2 * BLOCK_Q * 4)  # Q, dO, statistics
            + config.ds_buffers * ROWS_PER_CTA * BLOCK_Q * itemsize  # dS^T
            + NUM_CONSUMERS * BLOCK_Q * dq_cols * 4)  # dQ partials


def backward_supported(q, k, v, *, causal=True, sliding_window=None, q_segment_ids=None, kv_segment_ids=None,
                       logit_softcap=None, config: BackwardConfig | None = None) -> str | None:
    """None when the backward kernel handles these arguments (the device is not checked), else a reason."""
    reason = mosaic_unsupported_operands(q, k, v, q_segment_ids, kv_segment_ids, "backward")
    if reason is not None:
        return reason
    q_len, head_dim, kv_len = q.shape[1], q.shape[3], k.shape[1]
    config = config or default_backward_config(head_dim)
    if config.dq_split == "columns" and head_dim != 128:
        return f"dq_split='columns' needs head_dim 128, got {head_dim}"
    if shared_memory_bytes(head_dim, jnp.dtype(q.dtype).itemsize, config) > SHARED_MEMORY_BYTES:
        return (f"{config} needs {shared_memory_bytes(head_dim, jnp.dtype(q.dtype).itemsize, config)} bytes of "
                f"shared memory at head_dim {head_dim}, more than {SHARED_MEMORY_BYTES}")
    if q_len % BLOCK_Q:
        return f"q_len {q_len} is not a multiple of {BLOCK_Q}"
    if kv_len % ROWS_PER_CTA:
        return f"kv_len {kv_len} is not a multiple of {ROWS_PER_CTA}"
    if (causal or sliding_window is not None) and q_len > kv_len:
        return f"q_len {q_len} > kv_len {kv_len} with a causal or sliding-window mask"
    if sliding_window is not None and sliding_window < 1:
        return f"sliding_window must be at least 1, got {sliding_window}"
    if logit_softcap is not None and not logit_softcap > 0:
        return f"logit_softcap must be positive, got {logit_softcap}"
    return None


def _query_block_ranges(first_key, *, num_q_blocks, offset, causal, sliding_window):
    """Query blocks for key rows [first_key, first_key + ROWS_PER_CTA).

    Returns (lo, unmasked_lo, unmasked_hi, hi): only blocks in [lo, hi) see any of the keys; every query of the
    blocks [unmasked_lo, unmasked_hi) sees every key (no mask needed). Query i sits at key position i + offset.
    """
    last_key = first_key + ROWS_PER_CTA - 1
    lo = jnp.int32(0)
    unmasked_lo = jnp.int32(0)
    hi = jnp.int32(num_q_blocks)
    unmasked_hi = jnp.int32(num_q_blocks)
    if causal:  # a query sees keys at or before it
        lo = jnp.maximum(0, first_key - offset) // BLOCK_Q
        unmasked_lo = pl.cdiv(jnp.maximum(0, last_key - offset), BLOCK_Q)
    if sliding_window is not None:  # a query sees keys less than `sliding_window` back
        hi = jnp.minimum(hi, pl.cdiv(jnp.maximum(0, last_key + sliding_window - offset), BLOCK_Q))
        unmasked_hi = jnp.maximum(0, first_key + sliding_window - offset) // BLOCK_Q
    hi = jnp.maximum(hi, lo)
    unmasked_lo = jnp.clip(unmasked_lo, lo, hi)
    unmasked_hi = jnp.clip(unmasked_hi, unmasked_lo, hi)
    return lo, unmasked_lo, unmasked_hi, hi


def _backward(q, k, v, out, lse, d_out, *, causal, sliding_window, logit_softcap, config: BackwardConfig,
              interpret=False):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    stages = config.num_stages
    columns = config.dq_split == "columns"
    ds_buffers = config.ds_buffers
    dq_cols = head_dim // NUM_CONSUMERS if columns else head_dim  # dQ columns of one consumer's partial
    num_kv_tiles = kv_len // ROWS_PER_CTA
    num_q_blocks = q_len // BLOCK_Q
    offset = kv_len - q_len
    masked_any = causal or sliding_window is not None
    scale = head_dim**-0.5
    score_factor = (logit_softcap if logit_softcap is not None else scale) * LOG2E
    ranges = functools.partial(_query_block_ranges, num_q_blocks=num_q_blocks, offset=offset, causal=causal,
                               sliding_window=sliding_window)

    # Row statistics [batch, heads, 2, q_len] float32: lse in log2 units, delta = rowsum(dO * O).
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    stats = jnp.stack([lse.astype(jnp.float32) * LOG2E, delta], axis=2)
    d_out = d_out.astype(dtype)

    def kernel(q_ref, k_ref, v_ref, do_ref, stats_ref, dq_acc_ref, dk_ref, dv_ref,
               k_smem, v_smem, q_smem, do_smem, stats_smem, ds_smem, dq_smem, p_smem,
               kv_ready, q_ready, do_ready, stats_ready, consumed, meet):
        kv_head = lax.axis_index("heads")
        kv_tile = lax.axis_index("kv_tiles")
        batch_index = lax.axis_index("batch")
        warpgroup = lax.axis_index("wg")
        first_key = kv_tile * ROWS_PER_CTA
        lo, unmasked_lo, unmasked_hi, hi = ranges(first_key)
        blocks = hi - lo  # query blocks per query head
        total = group * blocks  # steps of the CTA

        def meeting():
            if columns:
                plgpu.barrier_arrive(meet)
                plgpu.barrier_wait(meet)

        @pl.when(warpgroup == NUM_CONSUMERS)
        def _producer():
            plgpu.set_max_registers(config.producer_registers, action="decrease")

            @pl.loop(0, total)
            def _(step):
                slot = lax.rem(step, jnp.int32(stages))
                head = kv_head * group + lax.div(step, blocks)
                first_q = (lo + lax.rem(step, blocks)) * BLOCK_Q

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                rows = (batch_index, pl.ds(first_q, BLOCK_Q), head)
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(stats_ref.at[batch_index, head, :, pl.ds(first_q, BLOCK_Q)],
                                        stats_smem.at[slot], stats_ready.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])

            # Observe the last releases too, so every barrier phase is waited for exactly once.
            @pl.loop(jnp.maximum(0, total - stages), total)
            def _(step):
                plgpu.barrier_wait(consumed.at[lax.rem(step, jnp.int32(stages))])

        @pl.when(warpgroup < NUM_CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(config.consumer_registers, action="increase")
            keys = (batch_index, pl.ds(first_key, ROWS_PER_CTA), kv_head)

            @pl.when(warpgroup == 0)
            def _():
                plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_ready.at[0])
                plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_ready.at[1])

            plgpu.barrier_wait(kv_ready.at[0])
            plgpu.barrier_wait(kv_ready.at[1])
            my_rows = pl.ds(warpgroup * BLOCK_KV, BLOCK_KV)
            my_first_key = first_key + warpgroup * BLOCK_KV
            k_mine, v_mine = k_smem.at[my_rows], v_smem.at[my_rows]
            dq_tile = dq_smem.at[warpgroup]

            def transform(s_t, first_q, masked):
                """Raw S^T [keys, queries] -> (log2-unit scores, the soft-cap's tanh or None)."""
                tanh = None
                if logit_softcap is not None:
                    tanh = jnp.tanh(s_t * (scale / logit_softcap))
                    s_t = tanh
                s_t = s_t * score_factor
                visible = None
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 1, layout=plgpu.Layout.WGMMA)
                    distance = (cols - rows) + (first_q + offset - my_first_key)  # query position - key position
                    if causal:
                        visible = distance >= 0
                    if sliding_window is not None:
                        in_window = distance < sliding_window
                        visible = in_window if visible is None else visible & in_window
                return s_t, tanh, visible

            def release(slot):
                """Q, dO and the statistics of `slot` are read."""
                plgpu.barrier_arrive(consumed.at[slot])

            def store_dq(dq, first_q, head):
                """The dQ partial of a query block: wait until the previous one has left shared memory, then
                reduce-add it into the float32 accumulator."""
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                dq_tile[...] = dq
                plgpu.commit_smem()
                head_cols = pl.ds(warpgroup * dq_cols, dq_cols) if columns else pl.ds(0, head_dim)
                if interpret:  # no TMA reduction in the interpreter: one slice of partials per consumer and CTA
                    part = kv_tile * NUM_CONSUMERS + warpgroup
                    plgpu.copy_smem_to_gmem(dq_tile, dq_acc_ref.at[part, batch_index, pl.ds(first_q, BLOCK_Q),
                                                                   head, head_cols])
                else:
                    plgpu.copy_smem_to_gmem(dq_tile, dq_acc_ref.at[batch_index, pl.ds(first_q, BLOCK_Q), head,
                                                                   head_cols], reduction_op="add")

            def dq_operands(buffer):
                """(A, B) of dQ = dS K for the dS^T in `buffer`: columns, the whole 128-key dS by this consumer's
                columns of K; rows, this consumer's keys of dS by all of its K."""
                if columns:
                    return buffer.transpose((1, 0)), k_smem.at[:, pl.ds(warpgroup * dq_cols, dq_cols)]
                return buffer.at[my_rows].transpose((1, 0)), k_mine

            def accumulate_products(carry, p_operand, ds_rows_operand, q_tile, do_tile, dq_a, dq_b):
                """dV += P^T dO, dK += dS^T Q and a dQ partial dq_a dq_b, all waited for -> (dk, dv), dq."""
                dk, dv = carry
                if interpret:  # the interpreter runs no wgmma on an accumulator initialised from registers
                    def products(dv_acc, dk_acc, dq_acc):
                        plgpu.wgmma(dv_acc, p_operand, do_tile)
                        plgpu.wgmma(dk_acc, ds_rows_operand, q_tile)
                        plgpu.wgmma(dq_acc, dq_a, dq_b)
                        return tuple(plgpu.wgmma_accumulator_load(a, wait_n=0) for a in (dv_acc, dk_acc, dq_acc))

                    d_v, d_k, dq = pl.run_scoped(products, plgpu.ACC((BLOCK_KV, head_dim), jnp.float32),
                                                 plgpu.ACC((BLOCK_KV, head_dim), jnp.float32),
                                                 plgpu.ACC((BLOCK_Q, dq_cols), jnp.float32))
                    return (dk + d_k, dv + d_v), dq

                def products(accs):  # dK, dV accumulate in place (the accumulators start from the registers)
                    dv_acc, dk_acc, dq_acc = accs
                    plgpu.wgmma(dv_acc, p_operand, do_tile)
                    plgpu.wgmma(dk_acc, ds_rows_operand, q_tile)
                    plgpu.wgmma(dq_acc, dq_a, dq_b)

                dq_zero = plgpu.layout_cast(jnp.zeros((BLOCK_Q, dq_cols), jnp.float32), plgpu.Layout.WGMMA)
                dv, dk, dq = pl.run_state(products)((plgpu.ACC.init(dv), plgpu.ACC.init(dk), plgpu.ACC.init(dq_zero)))
                return (dk, dv), dq

            def step(q_block, carry, *, head, step_base, masked):
                """One query block. carry: (dk, dv) [BLOCK_KV, head_dim] float32, in registers."""
                step_index = step_base + q_block
                slot = lax.rem(step_index, jnp.int32(stages))
                first_q = q_block * BLOCK_Q
                q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
                ds_index = lax.rem(step_index, jnp.int32(ds_buffers))
                ds_buffer = ds_smem.at[ds_index]
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(stats_ready.at[slot])

                def probabilities(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, k_mine, q_tile.transpose((1, 0)))
                    plgpu.barrier_wait(do_ready.at[slot])
                    plgpu.wgmma(dp_acc, v_mine, do_tile.transpose((1, 0)))
                    s_t = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
                    lse = plgpu.load(stats_smem.at[slot, 0], layout=plgpu.Layout.WGMMA.reduce(0))
                    s_t, tanh, visible = transform(s_t, first_q, masked)
                    p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                    if visible is not None:
                        p_t = jnp.where(visible, p_t, 0.0)
                    dp_t = plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)
                    delta = plgpu.load(stats_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(0))
                    ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                    if tanh is not None:  # d(cap * tanh(x / cap)) / dx
                        ds_t = ds_t * (1.0 - tanh * tanh)
                    return p_t.astype(dtype), ds_t.astype(dtype)

                shape = (BLOCK_KV, BLOCK_Q)
                p_t, ds_t = pl.run_scoped(probabilities, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))
                my_ds = ds_buffer.at[my_rows]
                my_ds[...] = ds_t
                p_operand, ds_rows_operand = p_t, ds_t  # A operands of dV, dK: registers on the GPU
                if interpret:  # the interpreter's wgmma takes A from shared memory only
                    p_tile = p_smem.at[warpgroup]
                    p_tile[...] = p_t
                    p_operand, ds_rows_operand = p_tile, my_ds
                plgpu.commit_smem()

                meeting()  # columns: both halves of dS^T are in shared memory
                carry, dq = accumulate_products(carry, p_operand, ds_rows_operand, q_tile, do_tile,
                                                *dq_operands(ds_buffer))
                release(slot)
                store_dq(dq, first_q, head)
                return carry

            def walk(carry):
                """Every query block of every query head of the group, masked edges apart."""
                def one_head(g, carry):
                    run = functools.partial(step, head=kv_head * group + g, step_base=g * blocks - lo)
                    if masked_any:
                        carry = lax.fori_loop(lo, unmasked_lo, functools.partial(run, masked=True), carry)
                    carry = lax.fori_loop(unmasked_lo, unmasked_hi, functools.partial(run, masked=False), carry)
                    if masked_any:
                        carry = lax.fori_loop(unmasked_hi, hi, functools.partial(run, masked=True), carry)
                    return carry

                return lax.fori_loop(0, group, one_head, carry)

            zeros = plgpu.layout_cast(jnp.zeros((BLOCK_KV, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = walk((zeros, zeros))
            plgpu.wait_smem_to_gmem(0)
            meeting()  # columns: the other consumer's last dQ product has read K
            k_mine[...] = (dk * scale).astype(dtype)
            v_mine[...] = dv.astype(dtype)
            plgpu.commit_smem()
            my_keys = (batch_index, pl.ds(my_first_key, BLOCK_KV), kv_head)
            plgpu.copy_smem_to_gmem(k_mine, dk_ref.at[my_keys], commit_group=False)
            plgpu.copy_smem_to_gmem(v_mine, dv_ref.at[my_keys], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

    swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    swizzled_f32 = dict(transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
    scratch = [
        plgpu.SMEM((ROWS_PER_CTA, head_dim), dtype, **swizzled),  # K, then dK
        plgpu.SMEM((ROWS_PER_CTA, head_dim), dtype, **swizzled),  # V, then dV
        plgpu.SMEM((stages, BLOCK_Q, head_dim), dtype, **swizzled),  # Q ring
        plgpu.SMEM((stages, BLOCK_Q, head_dim), dtype, **swizzled),  # dO ring
        plgpu.SMEM((stages, 2, BLOCK_Q), jnp.float32),  # lse / delta ring
        plgpu.SMEM((ds_buffers, ROWS_PER_CTA, BLOCK_Q), dtype, **swizzled),  # dS^T
        plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q, dq_cols), jnp.float32, **swizzled_f32),  # dQ partials
        # P^T staged through shared memory (interpret mode only; hardware keeps P^T in registers).
        plgpu.SMEM((NUM_CONSUMERS, BLOCK_KV, BLOCK_Q), dtype, **swizzled) if interpret else None,
        plgpu.Barrier(num_barriers=2),  # K, V landed
        plgpu.Barrier(num_barriers=stages),  # Q landed
        plgpu.Barrier(num_barriers=stages),  # dO landed
        plgpu.Barrier(num_barriers=stages),  # statistics landed
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),  # slot released by both consumers
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS),  # the consumers' meeting (dq_split="columns")
    ]
    mesh = plgpu.Mesh(grid=(kv_heads, num_kv_tiles, batch), grid_names=("heads", "kv_tiles", "batch"),
                      num_threads=NUM_CONSUMERS + 1, thread_name="wg")

    def body(*refs):
        pl.run_scoped(lambda *scratch_refs: kernel(*refs, *scratch_refs), *scratch, collective_axes="wg")

    if interpret:
        dq_acc = jax.new_ref(jnp.zeros((num_kv_tiles * NUM_CONSUMERS, batch, q_len, heads, head_dim), jnp.float32))
    else:
        dq_acc = jax.new_ref(jnp.zeros((batch, q_len, heads, head_dim), jnp.float32))
    dk, dv = pl.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        mesh=mesh,
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=_interpret_params() if interpret else False,
        name=(f"flash_attention_bwd_d{head_dim}_s{stages}_{config.dq_split}"
              f"_r{config.consumer_registers}"
              f"_{'causal' if causal else 'full'}"),
    )(q, k, v, d_out, stats, dq_acc)
    dq = jax.freeze(dq_acc)
    if interpret:
        dq = dq.sum(axis=0)
    return (dq * scale).astype(dtype), dk, dv


def flash_attention_backward_mosaic(q, k, v, out, lse, d_out, *, causal=True, sliding_window=None,
                                    logit_softcap=None, config: BackwardConfig | None = None,
                                    interpret: bool = False):
    """Attention backward from the forward's (out, lse [batch, heads, q_len] float32 natural log) and the
    output cotangent d_out -> (dq, dk, dv) in q's dtype. Raises ValueError where `backward_supported` does."""
    config = config or default_backward_config(q.shape[-1])
    reason = backward_supported(q, k, v, causal=causal, sliding_window=sliding_window,
                                logit_softcap=logit_softcap, config=config)
    if reason:
        raise ValueError(f"flash_attention_backward_mosaic: {reason}")
    return _backward(q, k, v, out, lse, d_out, causal=causal, sliding_window=sliding_window,
                     logit_softcap=logit_softcap, config=config, interpret=interpret)


def _interpret_params():
    import os

    if os.environ.get("LLMJAX_MGPU_LOG"):
        from jax._src.pallas.mosaic.interpret.params import LoggingMode

        return plgpu.InterpretGPUParams(logging_mode=LoggingMode.BARRIER)
    return plgpu.InterpretGPUParams()
