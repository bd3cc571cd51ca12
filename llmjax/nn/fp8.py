"""FP8 matmuls for training: per-tensor scaled e4m3 operands forward, e5m2 gradients backward.

    y = fp8_linear(x, kernel, bias, in_dims=1)        # as llmjax.nn.linear, the contraction in FP8
    history = update_amax_history(history, x)         # delayed scaling: a rolling window of |x| maxima
    scale = scale_from_history(history, E4M3)         # -> the scale the next step quantizes x with

How (Transformer Engine's recipe, written the way XLA wants it): each operand is quantized with its own scale,
x_q = clip(x / s, -max, max) in float8_e4m3fn, and dequantized back (x_q * s) right before the dot. On a Hopper GPU
XLA's FP8 rewriter recognizes this quantize / dequantize / dot pattern and runs one FP8 GEMM (cuBLASLt, scales
folded in); elsewhere (CPU, older GPUs) the same program runs the dot in the compute dtype on the rounded values,
so the numerics are those of FP8 operands everywhere and the tests check them on the CPU. The backward (a custom
VJP) quantizes the output gradient to float8_e5m2 (more range, less precision: gradients need range) with its own
current scale and contracts it with the forward's quantized operands, as the FP8 GEMMs of the backward would.

Scaling: `fp8_linear` uses current scaling (each tensor's scale from its own amax, computed in the same step: no
state, exact range use, one extra reduction per operand). Delayed scaling (the scale from the amax history of
earlier steps, which saves that reduction before the GEMM) needs state carried through the training step;
`update_amax_history` and `scale_from_history` are its two pure pieces.
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
    """The per-tensor scale that maps |x| <= amax onto the format's range, times 2**margin of headroom:
    amax / max * 2**margin (1 where amax is 0 or not finite, so an all-zero tensor stays zero) -> float32 []."""
    amax = jnp.asarray(amax, jnp.float32)
    scale = amax / fmt.max * (2.0**margin)
    return jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)


def quantize(x: jax.Array, scale: jax.Array, fmt: Fp8Format) -> jax.Array:
    """x / scale saturated to the format's range, in the float8 type (values past the range become +-max, never
    NaN: float8_e4m3fn has no infinity)."""
    scaled = x.astype(jnp.float32) / scale
    return jnp.clip(scaled, -fmt.max, fmt.max).astype(fmt.dtype)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """q * scale in `dtype`: the pattern XLA folds into an FP8 GEMM."""
    return q.astype(dtype) * scale.astype(dtype)


def quantize_dequantize(x: jax.Array, fmt: Fp8Format, scale: jax.Array | None = None) -> jax.Array:
    """x rounded to the float8 format under a per-tensor scale (current scaling when scale is None), in x's dtype."""
    if scale is None:
        scale = scale_for(jnp.max(jnp.abs(x)), fmt)
    return dequantize(quantize(x, scale, fmt), scale, x.dtype)


def _contract(x: jax.Array, kernel: jax.Array, in_dims: int) -> jax.Array:
    return jnp.tensordot(x, kernel, axes=in_dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x: jax.Array, kernel: jax.Array, in_dims: int) -> jax.Array:
    return _fp8_matmul_forward(x, kernel, in_dims)[0]


def _fp8_matmul_forward(x, kernel, in_dims):
    x_q = quantize_dequantize(x, E4M3)
    kernel_q = quantize_dequantize(kernel, E4M3)
    return jnp.tensordot(x_q, kernel_q, axes=in_dims), (x_q, kernel_q)


def _fp8_matmul_backward(in_dims, saved, g):
    x_q, kernel_q = saved  # [..., *in], [*in, *out]: the forward's quantized operands
    g_q = quantize_dequantize(g, E5M2)  # [..., *out]
    batch, out_dims = x_q.ndim - in_dims, kernel_q.ndim - in_dims
    # dx = g . kernel^T over the output axes; dkernel = x^T . g over the batch axes
    dx = jnp.tensordot(g_q, kernel_q, axes=(tuple(range(batch, batch + out_dims)),
                                            tuple(range(in_dims, in_dims + out_dims))))
    dkernel = jnp.tensordot(x_q, g_q, axes=(tuple(range(batch)), tuple(range(batch))))
    return dx.astype(x_q.dtype), dkernel.astype(kernel_q.dtype)


_fp8_matmul.defvjp(_fp8_matmul_forward, _fp8_matmul_backward)


def fp8_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, in_dims: int = 1) -> jax.Array:
    """llmjax.nn.linear with the contraction in FP8: x [..., *in] and kernel [*in, *out] quantized to e4m3 with
    per-tensor current scales, the output gradient to e5m2 in the backward; the bias added in x's dtype. The kernel
    is cast to x's dtype first (float32 master weights, bfloat16 compute)."""
    check_linear_operands("fp8_linear", x, kernel, in_dims)
    y = _fp8_matmul(x, kernel.astype(x.dtype), in_dims)
    return y if bias is None else y + bias.astype(y.dtype)


def update_amax_history(history: jax.Array, x: jax.Array) -> jax.Array:
    """Delayed scaling's state: history [length] float32, newest first; returns it shifted by one with |x|'s max
    in front (the oldest falls out)."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return jnp.concatenate([amax[None], history[:-1]])


def scale_from_history(history: jax.Array, fmt: Fp8Format, margin: int = 0) -> jax.Array:
    """The scale delayed scaling uses: from the largest amax in the history (Transformer Engine's "max" rule)."""
    return scale_for(jnp.max(history), fmt, margin)
