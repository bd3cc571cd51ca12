"""Argument checks shared by llmjax.nn: one clear error naming the argument and its shape, raised from
shapes and dtypes alone, so it fires when a function is traced, before any computation is built."""

from __future__ import annotations

import jax.numpy as jnp


def shape_of(x) -> str:
    return "[" + ", ".join(map(str, x.shape)) + "]"


def check_float(function: str, name: str, x) -> None:
    """x must be a floating-point array."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{function}: {name} must be floating point, got {x.dtype} {shape_of(x)}")


def check_integer(function: str, name: str, x) -> None:
    """x must be an integer array."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{function}: {name} must be integers, got {x.dtype} {shape_of(x)}")


def check_ndim(function: str, name: str, x, ndims: tuple[int, ...], layout: str) -> None:
    """x.ndim must be one of ndims; layout names the expected axes, e.g. "[batch, seq, heads, head_dim]"."""
    if x.ndim not in ndims:
        raise ValueError(f"{function}: {name} must be {layout}, got shape {shape_of(x)}")


def check_shape(function: str, name: str, x, expected: tuple, what: str) -> None:
    """x.shape must equal expected; `what` says where the expectation comes from."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{function}: {name} has shape {shape_of(x)}, expected [{', '.join(map(str, expected))}] ({what})"
        )


def check_broadcastable(function: str, name: str, x, target: tuple, layout: str) -> None:
    """x must broadcast to `target` (NumPy rules, same rank)."""
    fits = x.ndim == len(target) and all(a in (1, b) for a, b in zip(x.shape, target))
    if not fits:
        raise ValueError(
            f"{function}: {name} of shape {shape_of(x)} does not broadcast to {layout} = "
            f"[{', '.join(map(str, target))}]"
        )
