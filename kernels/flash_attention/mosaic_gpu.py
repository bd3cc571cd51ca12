"""FlashAttention forward for Hopper (H100 / H200) in Pallas Mosaic GPU, FlashAttention-3 style.

One CTA owns 2 * block_q query rows of one (batch, head) and runs three warpgroups:

- a producer warpgroup (few registers) streams K/V blocks into a ring of `num_stages` shared-memory
  slots with TMA, refilling a slot once both consumers have released it;
- two consumer warpgroups, block_q rows each, compute S = Q K^T and O += P V with wgmma.
  Their matrix work is interleaved ("ping-pong"): barriers order the two warpgroups so that one issues
  its wgmmas while the other does its softmax on the CUDA cores. With `pipelined`, each consumer also
  overlaps inside itself: S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued together and the softmax of
  S_j runs while the P V product is still on the tensor cores (the FlashAttention-3 intra-warpgroup
  pipeline), so the rescale of O by the new row maximum is the only thing left after it.

Scores are kept in log2 units (the softmax scale and log2(e) fold into one multiply-add before exp2);
the lse residual is converted back to the natural log. Causal and sliding-window masks cost nothing
on fully visible blocks: each consumer splits its key range into masked edges and an unmasked middle,
and skips blocks no query of its rows can see (the heaviest query tiles are launched first).

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] (GQA: query head h
reads kv head h // (heads // kv_heads)); out like q; lse [batch, heads, q_len] float32.
The backward pass is mosaic_gpu_backward.py's Hopper kernel where it supports the call, else the Triton
kernel's (`flash_attention_backward_triton`), both fed this forward's lse.

Supported: bf16 / f16, head_dim 64 and 128, causal or not, GQA / MQA, sliding window, logit soft-capping,
q_len <= kv_len (queries aligned to the end of the keys) or any lengths unmasked; q_len a multiple of 128
and kv_len of the key block (128, or 256 for unmasked head_dim 64). Not supported (`supported` says why;
the dispatcher then uses Triton): segment ids, other head dims, ragged tails, non-Hopper devices.

Speed against cuDNN and jax's bundled Mosaic GPU kernel: docs/perf.md, "Attention kernels (H200)" and
"Hopper forward schedules (Mosaic GPU)".
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

from ..platform import compute_device
from .validate import mosaic_unsupported_operands

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NUM_CONSUMERS = 2  # compute warpgroups per CTA; the producer is warpgroup NUM_CONSUMERS


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and schedule. block_q rows per consumer warpgroup (a CTA holds 2 * block_q)."""

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    pipelined: bool = True  # FlashAttention-3 intra-warpgroup overlap of softmax and P V
    # How the two consumers' wgmmas are ordered so one's softmax hides behind the other's matrix work:
    # "turn" (a turn passes between them), "rendezvous" (both meet twice a block) or "off".
    pingpong: str = "turn"
    consumer_registers: int = 240
    producer_registers: int = 24
    # Launch order: "heads" fastest (CTAs of one query tile across heads run together) or "q_tiles"
    # fastest (CTAs of one head together); "heads" measured faster (docs/perf.md, "Hopper forward schedules
    # (Mosaic GPU)").
    fastest_axis: str = "heads"

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one wgmma M tile per warpgroup), got {self.block_q}")
        if self.block_kv % 64:
            raise ValueError(f"block_kv must be a multiple of 64, got {self.block_kv}")
        if self.fastest_axis not in ("heads", "q_tiles"):
            raise ValueError(f"fastest_axis must be 'heads' or 'q_tiles', got {self.fastest_axis!r}")
        if self.pingpong not in ("turn", "rendezvous", "off"):
            raise ValueError(f"pingpong must be 'turn', 'rendezvous' or 'off', got {self.pingpong!r}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")

    @property
    def rows_per_cta(self) -> int:
        return NUM_CONSUMERS * self.block_q


def default_config(head_dim: int, *, causal: bool = True, sliding_window: int | None = None,
                   kv_len: int | None = None) -> KernelConfig:
    """The configuration measured fastest (docs/perf.md, "Hopper forward schedules (Mosaic GPU)", with the command).

    Unmasked attention at head_dim 128 runs the pipelined schedule with turn ping-pong. Masked attention runs the
    non-pipelined one with rendezvous ping-pong: its tiles are shorter on average, and the pipelined schedule's
    unhidden first S and last P V per tile cost more than its overlap wins. head_dim 64 unmasked takes 256-key
    blocks when kv_len allows; masked, 128 (a 256-wide diagonal block wastes more).
    """
    masked = causal or sliding_window is not None
    if head_dim == 64:
        if not masked and (kv_len is None or kv_len % 256 == 0):
            return KernelConfig(block_kv=256, num_stages=3, pipelined=False, pingpong="rendezvous")
        return KernelConfig(block_kv=128, num_stages=4, pipelined=False, pingpong="rendezvous")
    if masked:
        return KernelConfig(block_kv=128, num_stages=2, pipelined=False, pingpong="rendezvous")
    return KernelConfig(block_kv=128, num_stages=2, pipelined=True, pingpong="turn")


def _on_hopper() -> bool:
    try:
        device = compute_device()
    except RuntimeError:
        return False
    return device.platform == "gpu" and getattr(device, "compute_capability", None) == "9.0"


def supported(q, k, v, *, causal=True, sliding_window=None, q_segment_ids=None, kv_segment_ids=None,
              logit_softcap=None, config: KernelConfig | None = None, check_device: bool = True) -> str | None:
    """None when this kernel handles these arguments (on this device), else a short reason."""
    if check_device and not _on_hopper():
        return "the Mosaic GPU kernel needs a Hopper GPU (compute capability 9.0)"
    reason = mosaic_unsupported_operands(q, k, v, q_segment_ids, kv_segment_ids, "kernel")
    if reason is not None:
        return reason
    q_len, head_dim, kv_len = q.shape[1], q.shape[3], k.shape[1]
    config = config or default_config(head_dim, causal=causal, sliding_window=sliding_window, kv_len=kv_len)
    if q_len % config.rows_per_cta:
        return f"q_len {q_len} is not a multiple of {config.rows_per_cta}"
    if kv_len % config.block_kv:
        return f"kv_len {kv_len} is not a multiple of {config.block_kv}"
    if (causal or sliding_window is not None) and q_len > kv_len:
        return f"q_len {q_len} > kv_len {kv_len} with a causal or sliding-window mask (queries with no key)"
    if sliding_window is not None and sliding_window < 1:
        return f"sliding_window must be at least 1, got {sliding_window}"
    if logit_softcap is not None and not logit_softcap > 0:
        return f"logit_softcap must be positive, got {logit_softcap}"
    return None


def _key_block_ranges(first_row, block_q, *, block_kv, num_kv_blocks, causal, sliding_window):
    """Key blocks for query rows at key positions [first_row, first_row + block_q).

    Returns (lo, unmasked_lo, unmasked_hi, hi): the rows see keys only in blocks [lo, hi); every row sees
    every key of the blocks [unmasked_lo, unmasked_hi), which therefore need no mask.
    """
    last_row = first_row + block_q - 1
    lo = jnp.int32(0)
    unmasked_lo = jnp.int32(0)
    hi = jnp.int32(num_kv_blocks)
    unmasked_hi = jnp.int32(num_kv_blocks)
    if causal:  # keys at or before the row
        hi = jnp.minimum(hi, last_row // block_kv + 1)
        unmasked_hi = jnp.minimum(unmasked_hi, (first_row + 1) // block_kv)
    if sliding_window is not None:  # keys after row - window
        lo = jnp.maximum(0, first_row - sliding_window + 1) // block_kv
        unmasked_lo = pl.cdiv(jnp.maximum(0, last_row - sliding_window + 1), block_kv)
    unmasked_lo = jnp.clip(unmasked_lo, lo, hi)
    unmasked_hi = jnp.clip(unmasked_hi, unmasked_lo, hi)
    return lo, unmasked_lo, unmasked_hi, hi


def _forward(q, k, v, *, causal, sliding_window, logit_softcap, config: KernelConfig, interpret=False,
             qk_descale=None, out_dtype=None):
    """(out, lse): out [batch, q_len, heads, head_dim], lse [batch, heads, q_len] float32 (natural log).

    FP8 (q, k, v float8_e4m3fn, validated by `supported_fp8`): v comes transposed, [batch, kv_heads, head_dim,
    kv_len] (FP8 wgmma reads both operands K-major); `qk_descale` [2] float32 holds q's scale times k's (the raw
    scores are multiplied by it) and v's scale (the output is); P is rounded to e4m3 for the P V product, out is
    of `out_dtype`.
    """
    fp8 = jnp.dtype(q.dtype).itemsize == 1
    if not fp8:
        reason = supported(q, k, v, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap,
                           config=config, check_device=False)
        if reason:
            raise ValueError(f"flash_attention_mosaic: {reason}")
    # P reaches the P V product through shared memory in interpret mode (its wgmma takes A from shared memory
    # only) and in FP8 (jax 0.11's Mosaic GPU has no relayout of the float32 accumulator's registers into the
    # 8-bit register-operand layout); only the non-pipelined schedule does that.
    stage_p = interpret or fp8
    if stage_p and config.pipelined:
        raise ValueError("interpret mode and FP8 run only the non-pipelined schedule (P staged in shared memory)")
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    out_dtype = out_dtype or dtype
    block_q, block_kv, stages = config.block_q, config.block_kv, config.num_stages
    num_q_tiles = q_len // config.rows_per_cta
    num_kv_blocks = kv_len // block_kv
    offset = kv_len - q_len  # query i sits at key position i + offset
    masked_any = causal or sliding_window is not None
    # Scores go to log2 units: raw * scale * log2(e), or softcap * tanh(raw * scale / softcap) * log2(e).
    scale = head_dim**-0.5
    score_factor = (logit_softcap if logit_softcap is not None else scale) * LOG2E
    ranges = functools.partial(_key_block_ranges, block_q=block_q, block_kv=block_kv,
                               num_kv_blocks=num_kv_blocks, causal=causal, sliding_window=sliding_window)

    def kernel(q_ref, k_ref, v_ref, *refs):
        descale_ref, *refs = refs if fp8 else (None, *refs)
        (out_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, p_smem, o_smem,
         q_ready, k_ready, v_ready, k_consumed, v_consumed, schedule, turn) = refs
        head = lax.axis_index("heads")
        batch_index = lax.axis_index("batch")
        tile = lax.axis_index("q_tiles")
        if causal:  # the heaviest tiles (most keys) first, so the tail of the launch is short ones
            tile = num_q_tiles - 1 - tile
        kv_head = lax.div(head, jnp.int32(group))
        cta_row = tile * config.rows_per_cta  # first query row of this CTA
        # The CTA streams the union of its consumers' key ranges: consumer 0 starts first, 1 ends last.
        cta_lo = ranges(cta_row + offset)[0]
        cta_hi = ranges(cta_row + block_q + offset)[3]
        warpgroup = lax.axis_index("wg")

        def slot_of(block):  # ring slot of a key block; the ring starts at cta_lo
            return lax.rem(block - cta_lo, jnp.int32(stages))

        # Ping-pong. "rendezvous": both consumers meet twice a block, offset by one meeting, so one's
        # softmax runs while the other's wgmmas do (every block of the CTA's range is one beat for both).
        # "turn" (FlashAttention-3's order): a consumer waits for its turn, issues its wgmmas of a block and
        # hands the turn over; only the issue order is fixed, the softmaxes themselves may overlap.
        def rendezvous():
            if config.pingpong == "rendezvous":
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(schedule)

        def wait_turn():
            if config.pingpong == "turn":
                plgpu.barrier_wait(turn.at[warpgroup])

        def pass_turn():
            if config.pingpong == "turn":
                plgpu.barrier_arrive(turn.at[1 - warpgroup])

        @pl.when(warpgroup == NUM_CONSUMERS)
        def _producer():
            plgpu.set_max_registers(config.producer_registers, action="decrease")

            def fetch_k(block, slot):
                rows = (batch_index, pl.ds(block * block_kv, block_kv), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])

            def fetch_v(block, slot):  # FP8: V^T's [head_dim, block_kv] tile
                keys = pl.ds(block * block_kv, block_kv)
                tile = v_ref.at[batch_index, kv_head, :, keys] if fp8 else v_ref.at[batch_index, keys, kv_head]
                plgpu.copy_gmem_to_smem(tile, v_smem.at[slot], v_ready.at[slot])

            for slot in range(stages):
                @pl.when(cta_lo + slot < cta_hi)
                def _():
                    fetch_k(cta_lo + slot, slot)
                    fetch_v(cta_lo + slot, slot)

            @pl.loop(cta_lo + stages, cta_hi)
            def _(block):
                slot = slot_of(block)
                plgpu.barrier_wait(k_consumed.at[slot])
                fetch_k(block, slot)
                plgpu.barrier_wait(v_consumed.at[slot])
                fetch_v(block, slot)

            # Observe the last releases too, so every barrier phase is waited for exactly once.
            @pl.loop(jnp.maximum(cta_lo, cta_hi - stages), cta_hi)
            def _(block):
                plgpu.barrier_wait(k_consumed.at[slot_of(block)])
                plgpu.barrier_wait(v_consumed.at[slot_of(block)])

        @pl.when(warpgroup < NUM_CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(config.consumer_registers, action="increase")
            q_smem = qo_smem.at[warpgroup]
            first_row = cta_row + warpgroup * block_q  # query index of this warpgroup's first row
            lo, unmasked_lo, unmasked_hi, hi = ranges(first_row + offset)
            plgpu.copy_gmem_to_smem(q_ref.at[batch_index, pl.ds(first_row, block_q), head], q_smem,
                                    q_ready.at[warpgroup])
            plgpu.barrier_wait(q_ready.at[warpgroup])
            # FP8: the raw scores times q's and k's scales (a factor inside the soft-cap's tanh).
            qk_scale = descale_ref[0] if fp8 else 1.0
            v_scale = descale_ref[1] if fp8 else 1.0
            factor = score_factor if logit_softcap is not None else score_factor * qk_scale

            def v_operand(slot):  # V block as the P V product's [block_kv, head_dim] operand
                return v_smem.at[slot].transpose((1, 0)) if fp8 else v_smem.at[slot]

            def scores_log2(s, block, masked):
                """Raw Q K^T [block_q, block_kv] -> log2-unit scores (masked ones -inf)."""
                if logit_softcap is not None:
                    s = jnp.tanh(s * (qk_scale * (scale / logit_softcap)))
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    # query position - key position
                    distance = (rows - cols) + (first_row + offset - block * block_kv)
                    visible = None
                    if causal:
                        visible = distance >= 0
                    if sliding_window is not None:
                        in_window = distance < sliding_window
                        visible = in_window if visible is None else visible & in_window
                    s = jnp.where(visible, s, -jnp.inf)
                return s

            def softmax_step(s, row_max, row_sum):
                """Online softmax of one block: (p, new row max, new row sum, rescale of the old O)."""
                new_max = jnp.maximum(row_max, s.max(axis=1) * factor)
                if sliding_window is not None:  # a row may have seen no key yet: keep exp2 finite
                    new_max_safe = jnp.where(new_max == -jnp.inf, 0.0, new_max)
                else:
                    new_max_safe = new_max
                alpha = jnp.exp2(row_max - new_max_safe)
                p = jnp.exp2(s * factor - lax.broadcast_in_dim(new_max_safe, s.shape, [0]))
                row_sum = row_sum * alpha + p.sum(axis=1)
                return p.astype(dtype), new_max, row_sum, alpha

            def release_unused(block, _=None):
                """A block of the CTA's range that this warpgroup does not need: wait, release, keep the beat."""
                slot = slot_of(block)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                rendezvous()
                rendezvous()
                wait_turn()
                pass_turn()

            pl.when(warpgroup == 1)(rendezvous)  # offset the consumers by half a step: ping-pong
            pl.when(warpgroup == 1)(pass_turn)  # consumer 0 takes the first turn
            lax.fori_loop(cta_lo, lo, release_unused, None)

            row_max = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            row_sum = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

            def loops(step, carry):
                """Run `step` over [lo, hi): masked edges, unmasked middle."""
                first = lo
                if config.pipelined:
                    first = lo + 1  # block lo is the prologue
                a = jnp.maximum(unmasked_lo, first)
                b = jnp.maximum(unmasked_hi, a)
                if masked_any:
                    carry = lax.fori_loop(first, a, functools.partial(step, masked=True), carry)
                carry = lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
                if masked_any:
                    carry = lax.fori_loop(b, hi, functools.partial(step, masked=True), carry)
                return carry

            if config.pipelined:
                def body(o_acc):
                    # Prologue: S_lo and its softmax; P_lo V_lo is issued by the first step (or the epilogue).
                    slot = slot_of(lo)
                    plgpu.barrier_wait(k_ready.at[slot])

                    def first_scores(s_acc):
                        rendezvous()
                        wait_turn()
                        plgpu.wgmma(s_acc, q_smem, k_smem.at[slot].transpose((1, 0)))
                        pass_turn()
                        rendezvous()
                        return plgpu.wgmma_accumulator_load(s_acc, wait_n=0)

                    s = pl.run_scoped(first_scores, plgpu.ACC((block_q, block_kv), jnp.float32))
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    p, new_max, new_sum, _ = softmax_step(scores_log2(s, lo, masked_any), row_max, row_sum)

                    def step(block, carry, masked):
                        p_prev, row_max, row_sum = carry
                        slot, prev_slot = slot_of(block), slot_of(block - 1)
                        plgpu.barrier_wait(k_ready.at[slot])
                        plgpu.barrier_wait(v_ready.at[prev_slot])

                        def overlapped(s_acc):
                            rendezvous()
                            wait_turn()
                            plgpu.wgmma(s_acc, q_smem, k_smem.at[slot].transpose((1, 0)))
                            plgpu.wgmma(o_acc, p_prev, v_operand(prev_slot))
                            pass_turn()
                            rendezvous()
                            s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)  # S_j done, P V may run on
                            plgpu.barrier_arrive(k_consumed.at[slot])
                            p, new_max, new_sum, alpha = softmax_step(scores_log2(s, block, masked), row_max, row_sum)
                            o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
                            plgpu.barrier_arrive(v_consumed.at[prev_slot])
                            o_acc[...] = o * lax.broadcast_in_dim(alpha, o.shape, [0])
                            return p, new_max, new_sum

                        return pl.run_scoped(overlapped, plgpu.ACC((block_q, block_kv), jnp.float32))

                    p, new_max, new_sum = loops(step, (p, new_max, new_sum))
                    # Epilogue: the last block's P V.
                    slot = slot_of(hi - 1)
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.wgmma(o_acc, p, v_operand(slot))
                    o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
                    plgpu.barrier_arrive(v_consumed.at[slot])
                    return o, new_max, new_sum

                o, row_max, row_sum = pl.run_scoped(body, plgpu.ACC((block_q, head_dim), jnp.float32))
            else:
                def step(block, carry, masked):
                    o, row_max, row_sum = carry
                    slot = slot_of(block)
                    plgpu.barrier_wait(k_ready.at[slot])

                    def scores(s_acc):
                        wait_turn()
                        plgpu.wgmma(s_acc, q_smem, k_smem.at[slot].transpose((1, 0)))
                        pass_turn()
                        rendezvous()
                        return plgpu.wgmma_accumulator_load(s_acc, wait_n=0)

                    s = pl.run_scoped(scores, plgpu.ACC((block_q, block_kv), jnp.float32))
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    p, row_max, row_sum, alpha = softmax_step(scores_log2(s, block, masked), row_max, row_sum)
                    o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
                    rendezvous()
                    plgpu.barrier_wait(v_ready.at[slot])
                    if stage_p:
                        p_tile = p_smem.at[warpgroup]
                        p_tile[...] = p
                        plgpu.commit_smem()

                        def pv(acc):
                            plgpu.wgmma(acc, p_tile, v_operand(slot))
                            return plgpu.wgmma_accumulator_load(acc, wait_n=0)

                        o = o + pl.run_scoped(pv, plgpu.ACC((block_q, head_dim), jnp.float32))
                    else:
                        o = pl.run_state(lambda acc: plgpu.wgmma(acc, p, v_operand(slot)))(plgpu.ACC.init(o))
                    plgpu.barrier_arrive(v_consumed.at[slot])
                    return o, row_max, row_sum

                o = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
                o, row_max, row_sum = loops(step, (o, row_max, row_sum))

            lax.fori_loop(hi, cta_hi, release_unused, None)
            pl.when(warpgroup == 0)(rendezvous)  # match consumer 1's extra one
            pl.when(warpgroup == 0)(wait_turn)  # take consumer 1's last hand-over

            out = o * lax.broadcast_in_dim(v_scale / row_sum, o.shape, [0])
            out_tile = o_smem.at[warpgroup] if fp8 else q_smem  # bf16: Q is no longer read, its tile holds O
            out_tile[...] = out.astype(out_dtype)
            lse_tile = lse_smem.at[warpgroup]
            lse_tile[...] = row_max * LN2 + jnp.log(row_sum)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_tile, out_ref.at[batch_index, pl.ds(first_row, block_q), head])
            plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[batch_index, head, pl.ds(first_row, block_q)])
            plgpu.wait_smem_to_gmem(0)

    def swizzled(itemsize):  # 128-byte rows: 64 bf16 or 128 float8 elements
        return dict(transforms=(plgpu.TilingTransform((8, 128 // itemsize)), plgpu.SwizzleTransform(128)))

    item, out_item = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    scratch = [
        plgpu.SMEM((NUM_CONSUMERS, block_q, head_dim), dtype, **swizzled(item)),  # Q (then O, bf16)
        plgpu.SMEM((stages, block_kv, head_dim), dtype, **swizzled(item)),  # K ring
        plgpu.SMEM((stages, head_dim, block_kv) if fp8 else (stages, block_kv, head_dim), dtype,
                   **swizzled(item)),  # V ring (FP8: V^T)
        plgpu.SMEM((NUM_CONSUMERS, block_q), jnp.float32),  # lse
        # P staged through shared memory (interpret mode and FP8; bf16 on hardware keeps P in registers).
        plgpu.SMEM((NUM_CONSUMERS, block_q, block_kv), dtype, **swizzled(item)) if stage_p else None,
        plgpu.SMEM((NUM_CONSUMERS, block_q, head_dim), out_dtype, **swizzled(out_item)) if fp8 else None,  # O
        plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # Q landed
        plgpu.Barrier(num_barriers=stages),  # K landed
        plgpu.Barrier(num_barriers=stages),  # V landed
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),  # K released by both consumers
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),  # V released by both consumers
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS),  # ping-pong rendezvous
        plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # ping-pong turn of each consumer
    ]
    out, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, out_dtype),
                  jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
        scratch_types=scratch,
        grid=(heads, num_q_tiles, batch) if config.fastest_axis == "heads" else (num_q_tiles, heads, batch),
        grid_names=("heads", "q_tiles", "batch") if config.fastest_axis == "heads" else ("q_tiles", "heads", "batch"),
        num_threads=NUM_CONSUMERS + 1,
        thread_name="wg",
        # Row reductions stay inside a warp in the wgmma layout: no shared-memory scratch for them (this
        # leaves room for a third K/V stage at head_dim 128).
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=(f"flash_attention_fwd{'_fp8' if fp8 else ''}_d{head_dim}_kv{block_kv}_s{stages}"
                     f"{'_pipelined' if config.pipelined else ''}_{config.pingpong}"
                     f"_r{config.consumer_registers}_{'causal' if causal else 'full'}"),
    )(q, k, v, *([qk_descale] if fp8 else []))
    return out, lse


def flash_attention_forward_mosaic(q, k, v, *, causal=True, sliding_window=None, logit_softcap=None,
                                   config: KernelConfig | None = None, interpret: bool = False):
    """The forward kernel alone: (out [batch, q_len, heads, head_dim], lse [batch, heads, q_len] float32)."""
    config = config or default_config(q.shape[-1], causal=causal, sliding_window=sliding_window, kv_len=k.shape[1])
    if interpret and config.pipelined:
        config = dataclasses.replace(config, pipelined=False)
    return _forward(q, k, v, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap,
                    config=config, interpret=interpret)


FP8_DTYPE = jnp.float8_e4m3fn


def supported_fp8(q, k, v, *, causal=True, sliding_window=None, logit_softcap=None,
                  config: KernelConfig | None = None, check_device: bool = True) -> str | None:
    """None when `flash_attention_fp8_forward` handles these operands (on this device), else a short reason."""
    if any(jnp.dtype(x.dtype) != FP8_DTYPE for x in (q, k, v)):
        return f"the FP8 forward takes float8_e4m3fn q, k, v, got {q.dtype}/{k.dtype}/{v.dtype}"
    if q.ndim == 4 and q.shape[-1] != 128:
        return f"the FP8 forward supports head_dim 128 only (a 128-byte wgmma K step), got {q.shape[-1]}"
    as_bf16 = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in (q, k, v)]
    return supported(*as_bf16, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap,
                     config=config, check_device=check_device)


def flash_attention_fp8_forward(q, k, v, q_scale, k_scale, v_scale, *, causal=True, sliding_window=None,
                                logit_softcap=None, out_dtype=jnp.bfloat16, v_transposed: bool = False,
                                config: KernelConfig | None = None, interpret: bool = False):
    """Attention for inference on float8_e4m3fn operands that stand for q * q_scale, k * k_scale, v * v_scale
    (float32 scalars): both products run on the FP8 tensor cores, P rounded to e4m3 (it lies in [0, 1]) and
    staged through shared memory, so the non-pipelined schedule runs.

    q [batch, q_len, heads, 128]; k [batch, kv_len, kv_heads, 128]; v like k, or [batch, kv_heads, 128, kv_len]
    with `v_transposed` (FP8 wgmma reads V K-major: a cache kept transposed saves the transpose here).
    Returns out [batch, q_len, heads, 128] of `out_dtype`. Forward only: no gradient is defined.
    """
    v_t = v if v_transposed else jnp.transpose(v, (0, 2, 3, 1))  # [batch, kv_heads, head_dim, kv_len]
    batch, kv_heads, head_dim, kv_len = v_t.shape
    v_view = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), v_t.dtype)  # for the checks
    reason = supported_fp8(q, k, v_view, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap,
                           config=config, check_device=not interpret)
    if reason:
        raise ValueError(f"flash_attention_fp8_forward: {reason}")
    config = config or default_config(q.shape[-1], causal=causal, sliding_window=sliding_window, kv_len=k.shape[1])
    config = dataclasses.replace(config, pipelined=False)  # P goes through shared memory (see _forward)
    descale = jnp.stack([jnp.asarray(q_scale, jnp.float32) * jnp.asarray(k_scale, jnp.float32),
                         jnp.asarray(v_scale, jnp.float32)])
    out, _ = _forward(q, k, v_t, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap,
                      config=config, interpret=interpret, qk_descale=descale, out_dtype=out_dtype)
    return out


def _reference_backward(q, k, v, out, lse, d_out, *, causal, sliding_window, logit_softcap, **_):
    """Stand-in backward (jax.vjp of the jnp reference) for when the Triton backward is not importable."""
    from .reference import attention_reference

    del out, lse
    attention = functools.partial(attention_reference, causal=causal, sliding_window=sliding_window,
                                  logit_softcap=logit_softcap)
    return jax.vjp(attention, q, k, v)[1](d_out)


def _triton_backward():
    try:
        from .triton import flash_attention_backward_triton
    except ImportError:
        return _reference_backward
    return flash_attention_backward_triton


BACKWARDS = ("auto", "mosaic", "triton")
TRITON_BACKWARD_MAX_KV_LEN = 1024


def backward_for(q, k, v, *, causal, sliding_window, logit_softcap, backward: str = "auto") -> str:
    """Which backward runs after this forward: "mosaic" (mosaic_gpu_backward.py) where it supports the call
    and `backward` allows it, else "triton". "auto" also takes Triton over at most TRITON_BACKWARD_MAX_KV_LEN keys
    when masked or at head_dim 64, where it measured faster (short key ranges: docs/perf.md, "Hopper forward
    schedules (Mosaic GPU)")."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if backward == "triton":
        return "triton"
    from .mosaic_gpu_backward import backward_supported

    reason = backward_supported(q, k, v, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap)
    if reason and backward == "mosaic":
        raise ValueError(f"flash_attention_mosaic: backward='mosaic' cannot run this call: {reason}")
    short = k.shape[1] <= TRITON_BACKWARD_MAX_KV_LEN
    if backward == "auto" and short and (causal or sliding_window is not None or q.shape[-1] == 64):
        return "triton"
    return "triton" if reason else "mosaic"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, causal, sliding_window, logit_softcap, backward):
    return flash_attention_forward_mosaic(q, k, v, causal=causal, sliding_window=sliding_window,
                                          logit_softcap=logit_softcap)[0]


def _attention_fwd(q, k, v, causal, sliding_window, logit_softcap, backward):
    out, lse = flash_attention_forward_mosaic(q, k, v, causal=causal, sliding_window=sliding_window,
                                              logit_softcap=logit_softcap)
    return out, (q, k, v, out, lse)


def _attention_bwd(causal, sliding_window, logit_softcap, backward, residuals, d_out):
    q, k, v, out, lse = residuals
    masking = dict(causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap)
    if backward_for(q, k, v, backward=backward, **masking) == "mosaic":
        from .mosaic_gpu_backward import flash_attention_backward_mosaic

        return flash_attention_backward_mosaic(q, k, v, out, lse, d_out, **masking)
    return _triton_backward()(q, k, v, out, lse, d_out, q_segment_ids=None, kv_segment_ids=None, **masking)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_mosaic(q, k, v, *, causal=True, sliding_window=None, q_segment_ids=None, kv_segment_ids=None,
                           logit_softcap=None, backward: str = "auto"):
    """softmax(mask(q k^T / sqrt(head_dim))) v on Hopper -> [batch, q_len, heads, head_dim].

    Forward: this module's Mosaic GPU kernel. Backward (`backward`): "auto" runs the Mosaic GPU backward of
    mosaic_gpu_backward.py where it supports the call, else the Triton kernel fed the forward's lse;
    "mosaic" / "triton" force one. Raises ValueError for arguments `supported` rejects (the dispatcher routes
    those to Triton).
    """
    reason = supported(q, k, v, causal=causal, sliding_window=sliding_window, q_segment_ids=q_segment_ids,
                       kv_segment_ids=kv_segment_ids, logit_softcap=logit_softcap)
    if reason:
        raise ValueError(f"flash_attention_mosaic: {reason}")
    backward_for(q, k, v, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap,
                 backward=backward)  # a forced backward that cannot run fails here, not inside the vjp
    return _attention(q, k, v, causal, sliding_window, logit_softcap, backward)
