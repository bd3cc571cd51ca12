"""Global-norm gradient clipping on any pytree, in plain jax.numpy."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def _squared_global_norm(tree) -> jax.Array:
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    squares = [jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in jax.tree.leaves(tree)]
    return sum(squares, jnp.zeros((), dtype))


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every element of every leaf: a 0-d array.

    Accumulated in float32 whatever the leaves' dtypes (float64 when JAX's x64 mode is on), so
    bfloat16 gradients do not lose the sum. An empty tree has norm 0.
    """
    return jnp.sqrt(_squared_global_norm(tree))


def clip_by_global_norm(grads, max_norm):
    """(grads scaled so their global norm is at most max_norm, the global norm before clipping).

    grads: any pytree of float arrays; each leaf comes back in its own dtype (scaled in float32).
    scale = min(1, max_norm / norm): a tree already within max_norm (all zeros included) is returned
    unchanged, without dividing by its norm, and the gradient through this function stays finite there.
    Non-finite norms propagate: a NaN norm makes every leaf NaN; an infinite norm scales finite
    leaves to 0 and leaves holding inf to NaN (as optax.clip_by_global_norm does). The returned norm
    is NaN or inf in those cases, for the caller to act on.
    max_norm: > 0 (a Python number is checked here; an array is taken as given).
    """
    if isinstance(max_norm, numbers.Real) and not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm={max_norm} must be > 0")
    squared_norm = _squared_global_norm(grads)
    norm = jnp.sqrt(squared_norm)
    clipping = jnp.logical_not(norm <= max_norm)  # True for NaN too, so a NaN norm reaches every leaf
    # where it does not clip, take the root of 1 instead: the unselected branch of `where` is still
    # differentiated, and sqrt or 1/norm at 0 would turn its zero cotangent into NaN
    safe_squared_norm = jnp.where(clipping, squared_norm, 1.0)
    scale = jnp.where(clipping, max_norm / jnp.sqrt(safe_squared_norm), 1.0).astype(norm.dtype)
    clipped = jax.tree.map(lambda leaf: (leaf.astype(norm.dtype) * scale).astype(leaf.dtype), grads)
    return clipped, norm
