"""Cross-entropy of logits against integer targets."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from llmjax.nn._checks import check_float, check_integer, shape_of


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(nll, log_z), both [...] float32: -log softmax(logits)[target] and logsumexp(logits) per position.

    logits [..., classes] (any float dtype; the softmax statistics run in float32), targets [...] integers
    in [0, classes). The building block of `cross_entropy` and of the training loss, which sums it chunk
    by chunk of tokens.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z - target_logit, log_z


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    """Softmax cross-entropy of logits [..., classes] against integer targets [...].

    ignore_index: targets equal to it count for nothing (torch's convention, -100 by default; None:
        every target counts). A "mean" over no counted target is 0, not NaN.
    label_smoothing: eps in [0, 1): the target distribution is (1 - eps) one-hot + eps uniform, so the
        loss per token is (1 - eps) * nll + eps * mean over classes of -log p (as torch computes it).
    z_loss: adds z_loss * logsumexp(logits)^2 per counted token (PaLM), keeping the log-partition near 0.
    reduction: "mean" over counted targets, "sum", or "none" (per position [...], 0 where ignored).
    Computed in float32 (float64 for float64 logits); returns float32 (or float64).
    """
    check_float("cross_entropy", "logits", logits)
    check_integer("cross_entropy", "targets", targets)
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"cross_entropy: targets {shape_of(targets)} must have the shape of logits {shape_of(logits)} "
            f"without its last (classes) axis"
        )
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"cross_entropy: label_smoothing={label_smoothing} must be within [0, 1)")
    if z_loss < 0:
        raise ValueError(f"cross_entropy: z_loss={z_loss} must be >= 0")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction={reduction!r}: expected 'mean', 'sum' or 'none'")

    counted = jnp.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
    safe_targets = jnp.where(counted, targets, 0)
    nll, log_z = token_cross_entropy(logits, safe_targets)
    loss = nll
    if label_smoothing:
        mean_logit = logits.astype(nll.dtype).mean(-1)
        loss = (1 - label_smoothing) * nll + label_smoothing * (log_z - mean_logit)
    if z_loss:
        loss = loss + z_loss * jnp.square(log_z)
    loss = jnp.where(counted, loss, 0)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / jnp.maximum(counted.sum(), 1)
