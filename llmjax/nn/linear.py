"""Linear maps and embedding lookup."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.nn._checks import (
    check_float,
    check_integer,
    check_ndim,
    check_shape,
    shape_of,
)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, in_dims: int = 1) -> jax.Array:
    """x [..., *in] @ kernel [*in, *out] (+ bias [*out]) -> [..., *out].

    The last `in_dims` axes of x are contracted with the first `in_dims` axes of kernel, so a
    projection keeps its natural shape: queries are linear(x, W_q [d_model, heads, head_dim]) and
    the output projection linear(attn [..., heads, head_dim], W_o [heads, head_dim, d_model], in_dims=2).
    The matmul runs in the operands' dtype (cast them first for mixed precision). A 2-D kernel may be any
    matrix-like object that defines `x @ kernel` (llmjax.quant's QuantizedMatrix dequantizes on the fly).
    """
    check_linear_operands("linear", x, kernel, in_dims)
    y = x @ kernel if in_dims == 1 and len(kernel.shape) == 2 else jnp.tensordot(x, kernel, axes=in_dims)
    if bias is None:
        return y
    check_shape("linear", "bias", bias, kernel.shape[in_dims:], "the kernel's output axes")
    return y + bias


def check_linear_operands(function: str, x: jax.Array, kernel, in_dims: int) -> None:
    """ValueError unless x [..., *in] and kernel [*in, *out] are float arrays whose in axes agree."""
    check_float(function, "x", x)
    if getattr(kernel, "dtype", None) is not None:
        check_float(function, "kernel", kernel)
    if not 1 <= in_dims <= min(x.ndim, len(kernel.shape)):
        raise ValueError(f"{function}: in_dims={in_dims} does not fit x {shape_of(x)} and kernel {shape_of(kernel)}")
    if x.shape[x.ndim - in_dims:] != kernel.shape[:in_dims]:
        raise ValueError(
            f"{function}: the last {in_dims} axes of x {shape_of(x)} must equal the first {in_dims} of kernel "
            f"{shape_of(kernel)}"
        )


def embedding(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of table [num_embeddings, dim] at integer ids [...] -> [..., dim].

    ids outside [0, num_embeddings) give NaN rows under jit (jnp.take's fill mode) rather than
    another row's values; check ids on the host where that matters.
    """
    check_ndim("embedding", "table", table, (2,), "[num_embeddings, dim]")
    check_integer("embedding", "ids", ids)
    return jnp.take(table, ids, axis=0)
