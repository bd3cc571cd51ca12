"""Activations, gated units and softmax.

The gated units take the two projections already computed (gate, up), so the SwiGLU feed-forward
of LLaMA is linear(swiglu(linear(x, W_gate), linear(x, W_up)), W_down).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llmjax.nn._checks import check_float, shape_of


def gelu(x: jax.Array, *, approximate: bool = False) -> jax.Array:
    """Gaussian error linear unit x * Phi(x) (Hendrycks & Gimpel 2016).

    approximate=False: the exact form with erf. approximate=True: GPT-2's tanh approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    """
    check_float("gelu", "x", x)
    if approximate:
        return x * (0.5 * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))))
    return x * (0.5 * (1 + jax.lax.erf(x / math.sqrt(2))))


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that CLIP was trained with (its "quick_gelu")."""
    check_float("quick_gelu", "x", x)
    return x * jax.nn.sigmoid(1.702 * x)


def silu(x: jax.Array) -> jax.Array:
    """x * sigmoid(x) (also called swish)."""
    check_float("silu", "x", x)
    return x * jax.nn.sigmoid(x)


def _check_gate_and_up(function: str, gate, up) -> None:
    check_float(function, "gate", gate)
    check_float(function, "up", up)
    if gate.shape != up.shape:
        raise ValueError(f"{function}: gate {shape_of(gate)} and up {shape_of(up)} must have the same shape")


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up (Shazeer 2020): LLaMA's gated unit, on the two projections [..., d_ff]."""
    _check_gate_and_up("swiglu", gate, up)
    return silu(gate) * up


def geglu(gate: jax.Array, up: jax.Array, *, approximate: bool = False) -> jax.Array:
    """gelu(gate) * up (Shazeer 2020; Gemma uses approximate=True), on the two projections [..., d_ff]."""
    _check_gate_and_up("geglu", gate, up)
    return gelu(gate, approximate=approximate) * up


def _check_axis(function: str, x, axis: int) -> None:
    check_float(function, "x", x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{function}: axis={axis} is out of range for x of shape {shape_of(x)}")


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """x - logsumexp(x) along `axis`, computed in float32 (or float64) after subtracting the maximum,
    returned in x's dtype. -inf entries get -inf; an all -inf slice gives NaN (no distribution)."""
    _check_axis("log_softmax", x, axis)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    shifted = x32 - jax.lax.stop_gradient(x32.max(axis, keepdims=True))
    return (shifted - jnp.log(jnp.exp(shifted).sum(axis, keepdims=True))).astype(x.dtype)


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """exp(x) / sum(exp(x)) along `axis`, computed in float32 (or float64) after subtracting the maximum
    (so no overflow for any finite input), returned in x's dtype."""
    _check_axis("softmax", x, axis)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    unnormalized = jnp.exp(x32 - jax.lax.stop_gradient(x32.max(axis, keepdims=True)))
    return (unnormalized / unnormalized.sum(axis, keepdims=True)).astype(x.dtype)
