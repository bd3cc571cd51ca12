"""Normalization over the last axis: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

Statistics are computed in float32 (float64 for float64 input) whatever x's dtype, and the result is
returned in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.nn._checks import check_float, check_shape


def _checked(function: str, x, scale, bias, eps) -> None:
    check_float(function, "x", x)
    if x.ndim < 1:
        raise ValueError(f"{function}: x must have at least one axis (the one normalized), got a scalar")
    for name, param in (("scale", scale), ("bias", bias)):
        if param is not None:
            check_float(function, name, param)
            check_shape(function, name, param, x.shape[-1:], "x's last axis")
    if not eps > 0:
        raise ValueError(f"{function}: eps={eps} must be > 0")


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float = 1e-5) -> jax.Array:
    """x [..., d] -> (x - mean) / sqrt(var + eps) * scale [d] + bias [d], statistics over d.

    scale / bias None: no scale (ones) / no bias (zeros), as in LayerNorm without affine parameters.
    """
    _checked("layer_norm", x, scale, bias, eps)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(x32.dtype)
    if bias is not None:
        y = y + bias.astype(x32.dtype)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float = 1e-6) -> jax.Array:
    """x [..., d] -> x / sqrt(mean(x^2) + eps) * scale [d], statistics over d (no mean subtracted).

    scale None: no scale (ones).
    """
    _checked("rms_norm", x, scale, None, eps)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(x32.dtype)
    return y.astype(x.dtype)
