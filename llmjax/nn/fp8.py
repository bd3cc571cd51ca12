"""FP8 matmuls for training: per-tensor scaled e4m3 operands forward, e5m2 gradients backward.

    y = fp8_linear(x, kernel, bias, in_dims=1)        # as llmjax.nn.linear, the contraction in FP8 (current scaling)
    y = fp8_linear(x, kernel, history=history)        # delayed scaling: history [3, H], its gradient the new history
    history = update_amax_history(history, amaxes)    # the rolling window of |x| maxima, newest first
    scale = scale_from_history(history[0], E4M3)      # -> the scale the next step quantizes x with

How: each operand is quantized with its own per-tensor scale, x_q = clip(x / s, -max, max) in float8_e4m3fn, and
the float8 operands go into `jax.lax.dot_general` as they are, the product times s_x * s_k: on a Hopper GPU XLA
runs that as one FP8 GEMM (cuBLASLt, float32 accumulation, the scale in its epilogue); elsewhere (CPU) XLA widens
the float8 operands and runs the dot in the compute dtype, so the numerics are those of FP8 operands everywhere and
the tests check them on the CPU. (The quantize -> dequantize -> dot pattern that XLA's FP8 rewriter was meant to
match is not rewritten by jax 0.11.2 on an H100: XLA drops the float8 round trip and runs a bf16 GEMM; measured in
docs/perf.md.) The backward (a custom VJP) quantizes the output gradient to float8_e5m2 (more range, less
precision: gradients need range) and contracts it with the forward's saved float8 operands (half the bytes of
bf16 residuals): two more FP8 GEMMs. Scales are powers of two (2**ceil(log2(amax / max))): dividing by one and
multiplying the product by two of them is exact in any float type, at the cost of at most one binade of range.

Scaling, two recipes:
- current (history=None): each tensor's scale from its own amax, computed in the same step: no state, the range
  fits, one reduction per operand before its quantization;
- delayed (history [3, H] float32: the amax histories of x, the kernel and the output gradient, newest first):
  the scales come from the largest amax of the last H steps (Transformer Engine's recipe), so quantizing need
  not wait for a reduction over the tensor; the step's own amaxes are pushed into the history. The new history
  leaves the function as the history's gradient ("overwrite with gradient", as Flax's fp8 ops do): a training
  step replaces each history by what its gradient holds (`take_new_histories`) instead of giving it to the
  optimizer, and accumulates it over micro-batches by max (`accumulate_gradients`). A history of zeros (the
  first step) gives scale 1.

Under XLA SPMD every amax is the global one (the max of a sharded tensor is all-reduced), so a sharded run
rounds exactly as one device does, with either recipe.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llmjax.nn.linear import check_linear_operands


@dataclass(frozen=True)
class Fp8Format:
    """A float8 type and the largest finite value it holds."""

    dtype: jnp.dtype
    max: float


E4M3 = Fp8Format(jnp.float8_e4m3fn, float(jnp.finfo(jnp.float8_e4m3fn).max))  # 448: forward operands
E5M2 = Fp8Format(jnp.float8_e5m2, float(jnp.finfo(jnp.float8_e5m2).max))  # 57344: gradients


def scale_for(amax: jax.Array, fmt: Fp8Format, margin: int = 0) -> jax.Array:
    """The per-tensor scale that maps |x| <= amax into the format's range: the power of two
    2**(ceil(log2(amax / max)) + margin) (1 where amax is 0 or not finite, so an all-zero tensor stays zero)
    -> float32 []."""
    amax = jnp.asarray(amax, jnp.float32)
    mantissa, exponent = jnp.frexp(amax / fmt.max)  # amax / max = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent) + margin  # ceil(log2(amax / max)), exactly
    scale = jnp.ldexp(jnp.float32(1.0), exponent)
    return jnp.where(jnp.isfinite(amax) & (amax > 0) & (scale > 0), scale, 1.0)


def quantize(x: jax.Array, scale: jax.Array, fmt: Fp8Format) -> jax.Array:
    """x / scale saturated to the format's range, in the float8 type (values past the range become +-max, never
    NaN: float8_e4m3fn has no infinity). The division is exact (a power-of-two scale), so it runs in x's dtype."""
    scaled = x / scale.astype(x.dtype)
    return jnp.clip(scaled, -fmt.max, fmt.max).astype(fmt.dtype)


def quantize_dequantize(x: jax.Array, fmt: Fp8Format, scale: jax.Array | None = None) -> jax.Array:
    """x rounded to the float8 format under a per-tensor scale (current scaling when scale is None), in x's dtype."""
    if scale is None:
        scale = scale_for(_amax(x), fmt)
    return quantize(x, scale, fmt).astype(x.dtype) * scale.astype(x.dtype)


def _amax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def _scaled_dot(a_q, a_scale, b_q, b_scale, contracting, dtype) -> jax.Array:
    """(a_q . b_q) * a_scale * b_scale over the contracting axes (lhs, rhs), float8 operands, out in dtype."""
    y = jax.lax.dot_general(a_q, b_q, (contracting, ((), ())), preferred_element_type=dtype)
    return y * (a_scale * b_scale).astype(dtype)  # powers of two: exact in any float type


def _forward_dot(x_q, x_scale, kernel_q, kernel_scale, in_dims, dtype) -> jax.Array:
    """x [..., *in] . kernel [*in, *out] -> [..., *out]."""
    return _scaled_dot(x_q, x_scale, kernel_q, kernel_scale,
                       (tuple(range(x_q.ndim - in_dims, x_q.ndim)), tuple(range(in_dims))), dtype)


def _backward_dots(x_q, x_scale, kernel_q, kernel_scale, g_q, g_scale, in_dims, dtype):
    """dx = g . kernel^T over the output axes, dkernel = x^T . g over the batch axes, from float8 operands."""
    batch, out_dims = x_q.ndim - in_dims, kernel_q.ndim - in_dims
    dx = _scaled_dot(g_q, g_scale, kernel_q, kernel_scale,
                     (tuple(range(batch, batch + out_dims)), tuple(range(in_dims, in_dims + out_dims))), dtype)
    dkernel = _scaled_dot(x_q, x_scale, g_q, g_scale, (tuple(range(batch)), tuple(range(batch))), dtype)
    return dx, dkernel


def _scale(x: jax.Array, fmt: Fp8Format, history: jax.Array | None) -> jax.Array:
    """x's scale: from its own amax (current scaling, history None) or from its amax history [H] (delayed)."""
    return scale_for(_amax(x), fmt) if history is None else scale_from_history(history, fmt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_matmul(x: jax.Array, kernel: jax.Array, history: jax.Array | None, in_dims: int) -> jax.Array:
    return _fp8_matmul_forward(x, kernel, history, in_dims)[0]


def _fp8_matmul_forward(x, kernel, history, in_dims):
    x_scale = _scale(x, E4M3, None if history is None else history[0])
    kernel_scale = _scale(kernel, E4M3, None if history is None else history[1])
    x_q, kernel_q = quantize(x, x_scale, E4M3), quantize(kernel, kernel_scale, E4M3)
    amaxes = None if history is None else jnp.stack([_amax(x), _amax(kernel)])  # [2]: this step's, for the history
    y = _forward_dot(x_q, x_scale, kernel_q, kernel_scale, in_dims, x.dtype)
    return y, (x_q, x_scale, kernel_q, kernel_scale, history, amaxes)


def _fp8_matmul_backward(in_dims, saved, g):
    x_q, x_scale, kernel_q, kernel_scale, history, amaxes = saved  # x_q [..., *in], kernel_q [*in, *out]: float8
    g_scale = _scale(g, E5M2, None if history is None else history[2])
    dx, dkernel = _backward_dots(x_q, x_scale, kernel_q, kernel_scale, quantize(g, g_scale, E5M2), g_scale,
                                 in_dims, g.dtype)
    if history is None:
        return dx, dkernel, None
    new_history = update_amax_history(history, jnp.concatenate([amaxes, _amax(g)[None]]))  # [3, H]
    return dx, dkernel, new_history  # the history's "gradient" is its next value


_fp8_matmul.defvjp(_fp8_matmul_forward, _fp8_matmul_backward)


def fp8_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, in_dims: int = 1,
               history: jax.Array | None = None) -> jax.Array:
    """llmjax.nn.linear with the contraction in FP8: x [..., *in] and kernel [*in, *out] quantized to e4m3 with
    per-tensor scales, the output gradient to e5m2 in the backward; the bias added in x's dtype. The kernel is cast
    to x's dtype first (float32 master weights, bfloat16 compute). history: None for current scaling, or delayed
    scaling's state [3, H] float32 (amax histories of x, kernel and output gradient), whose gradient is its next
    value (see the module's docstring)."""
    check_linear_operands("fp8_linear", x, kernel, in_dims)
    if history is not None:
        if history.ndim != 2 or history.shape[0] != 3:
            raise ValueError(f"fp8_linear: history has shape {history.shape}; delayed scaling keeps [3, H] (the amax "
                             f"histories of x, the kernel and the output gradient)")
        history = history.astype(jnp.float32)
    y = _fp8_matmul(x, kernel.astype(x.dtype), history, in_dims)
    return y if bias is None else y + bias.astype(y.dtype)


def update_amax_history(history: jax.Array, amax: jax.Array) -> jax.Array:
    """Delayed scaling's state: history [..., H] float32, newest first; returns it shifted by one along its last
    axis with amax [...] in front (the oldest falls out)."""
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.concatenate([amax[..., None], history[..., :-1]], axis=-1)


def scale_from_history(history: jax.Array, fmt: Fp8Format, margin: int = 0) -> jax.Array:
    """The scale delayed scaling uses: from the largest amax in the history [H] (Transformer Engine's "max" rule)."""
    return scale_for(jnp.max(history), fmt, margin)


# --- delayed scaling in a training step: histories are parameters whose gradient is their next value ----------

HISTORY = "fp8_history"  # the key of a layer's delayed-scaling state in its parameter dict


def _is_history(path) -> bool:
    return bool(path) and getattr(path[-1], "key", None) == HISTORY


def without_histories(grads):
    """The gradients with every history's "gradient" zeroed: what the optimizer sees (histories are not trained)."""
    return jax.tree_util.tree_map_with_path(lambda path, g: jnp.zeros_like(g) if _is_history(path) else g, grads)


def take_new_histories(params, grads):
    """params with every history replaced by its gradient (the history after this step's amaxes)."""
    return jax.tree_util.tree_map_with_path(lambda path, p, g: g.astype(p.dtype) if _is_history(path) else p,
                                            params, grads)


def accumulate_gradients(total, grads):
    """total + grads over micro-batches, histories combined by max (each micro-batch's history holds the same
    older steps and its own newest amax: the max is the amax of the whole batch)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a, b: jnp.maximum(a, b) if _is_history(path) else a + b, total, grads)
