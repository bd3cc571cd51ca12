"""Learning-rate schedules as plain functions of the step: closed forms, no state, no optax.

Every schedule takes the step first, then its hyperparameters, and returns the learning rate:

    lr = cosine_schedule(step, max_lr=3e-4, min_lr=3e-5, warmup=100, total=1000)

`step` is a Python int or an integer array (a traced step inside jit, or a vector of steps: the
result has its shape). The rate is computed in JAX's default float dtype: float32, or float64
when x64 is enabled (`jax.enable_x64(True)`). All schedules share one shape:

    step < warmup            max_lr * step / warmup                 (linear warmup from 0)
    warmup <= step < total   the decay, from max_lr towards min_lr
    step >= total            min_lr                                 (at total and after)

When warmup == total there is no decay phase: the rate jumps from the warmup to min_lr at
`total`. With warmup == 0 the first step already runs at max_lr.

Hyperparameters given as Python numbers are checked on every call (and once by
`make_schedule`): a bad one raises one ValueError naming it. A negative traced step counts as 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

Schedule = Callable[..., jax.Array]  # step -> learning rate


def _float_dtype():
    """float32, or float64 under x64: read at call time, so `jax.enable_x64` takes effect."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_schedule_arguments(schedule: str, *, step=0, max_lr=0.0, min_lr=0.0, warmup=0, total=None,
                             decay_fraction=None) -> None:
    """Raise one ValueError naming the first bad argument; arguments that are arrays are not checked."""

    def fail(problem: str):
        raise ValueError(f"{schedule}: {problem}")

    for name, value in (("step", step), ("warmup", warmup), ("total", total), ("max_lr", max_lr),
                        ("min_lr", min_lr)):
        if value is not None and _is_number(value) and not value >= 0:  # `not >=` also catches NaN
            fail(f"{name}={value} must be >= 0")
    if _is_number(warmup) and _is_number(total) and warmup > total:
        fail(f"warmup={warmup} exceeds total={total}; warmup must be <= total")
    if _is_number(min_lr) and _is_number(max_lr) and min_lr > max_lr:
        fail(f"min_lr={min_lr} exceeds max_lr={max_lr}; min_lr must be <= max_lr")
    if decay_fraction is not None and _is_number(decay_fraction) and not 0 < decay_fraction <= 1:
        fail(f"decay_fraction={decay_fraction} must be within (0, 1]")


def _with_warmup(step, max_lr, min_lr, warmup, total, decay: Callable[..., jax.Array]) -> jax.Array:
    """The shared shape: linear warmup, then `decay` before `total`, min_lr from `total` on.

    decay(step, max_lr, min_lr, warmup, total) receives every argument as an array of one float dtype.
    """
    dtype = _float_dtype()
    step, max_lr, min_lr, warmup, total = (jnp.asarray(value, dtype) for value in (step, max_lr, min_lr, warmup, total))
    step = jnp.maximum(step, 0)
    warming = max_lr * step / jnp.maximum(warmup, 1)  # used only where step < warmup, so where warmup >= 1
    decaying = decay(step, max_lr, min_lr, warmup, total)
    return jnp.where(step < warmup, warming, jnp.where(step >= total, min_lr, decaying))


def cosine_schedule(step, max_lr, min_lr, warmup, total) -> jax.Array:
    """Linear warmup 0 -> max_lr over `warmup` steps, then a half cosine from max_lr to min_lr at `total`.

    After warmup: min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2,
    progress = (step - warmup) / (total - warmup).
    """
    check_schedule_arguments("cosine_schedule", step=step, max_lr=max_lr, min_lr=min_lr, warmup=warmup, total=total)

    def cosine(step, max_lr, min_lr, warmup, total):
        progress = (step - warmup) / jnp.maximum(total - warmup, 1)
        return min_lr + (max_lr - min_lr) * 0.5 * (1 + jnp.cos(math.pi * progress))

    return _with_warmup(step, max_lr, min_lr, warmup, total, cosine)


def linear_schedule(step, max_lr, min_lr, warmup, total) -> jax.Array:
    """Linear warmup 0 -> max_lr over `warmup` steps, then a straight line from max_lr to min_lr at `total`.

    After warmup: min_lr + (max_lr - min_lr) * (total - step) / (total - warmup).
    """
    check_schedule_arguments("linear_schedule", step=step, max_lr=max_lr, min_lr=min_lr, warmup=warmup, total=total)

    def linear(step, max_lr, min_lr, warmup, total):
        return min_lr + (max_lr - min_lr) * (total - step) / jnp.maximum(total - warmup, 1)

    return _with_warmup(step, max_lr, min_lr, warmup, total, linear)


def wsd_schedule(step, max_lr, min_lr, warmup, total, decay_fraction) -> jax.Array:
    """Warmup-stable-decay: linear warmup, max_lr held, then a linear decay to min_lr at `total`.

    The decay covers the last `decay_fraction` of the steps after warmup:
    decay_steps = decay_fraction * (total - warmup) (not rounded to a whole step), and where
    total - step < decay_steps, lr = min_lr + (max_lr - min_lr) * (total - step) / decay_steps.
    """
    check_schedule_arguments("wsd_schedule", step=step, max_lr=max_lr, min_lr=min_lr, warmup=warmup, total=total,
                             decay_fraction=decay_fraction)

    def stable_then_linear(step, max_lr, min_lr, warmup, total):
        decay_steps = jnp.asarray(decay_fraction, step.dtype) * (total - warmup)
        remaining = total - step
        decaying = min_lr + (max_lr - min_lr) * remaining / jnp.where(decay_steps > 0, decay_steps, 1)
        return jnp.where(remaining < decay_steps, decaying, max_lr)

    return _with_warmup(step, max_lr, min_lr, warmup, total, stable_then_linear)


def constant_schedule(step, max_lr, warmup=0) -> jax.Array:
    """Linear warmup 0 -> max_lr over `warmup` steps, then max_lr for ever."""
    check_schedule_arguments("constant_schedule", step=step, max_lr=max_lr, warmup=warmup)

    def constant(step, max_lr, min_lr, warmup, total):
        return jnp.broadcast_to(max_lr, step.shape)

    return _with_warmup(step, max_lr, max_lr, warmup, math.inf, constant)


SCHEDULE_FUNCTIONS = {"cosine": cosine_schedule, "linear": linear_schedule, "wsd": wsd_schedule,
                      "constant": constant_schedule}


def make_schedule(name: str, *, max_lr, min_lr=0.0, warmup=0, total=None, decay_fraction=0.2) -> Schedule:
    """A `step -> learning rate` function (what optax takes as `learning_rate`), checked once here.

    name: "cosine", "linear", "wsd" or "constant" (which ignores min_lr, total and decay_fraction).
    """
    if name not in SCHEDULE_FUNCTIONS:
        raise ValueError(f"make_schedule: name={name!r}: expected one of {', '.join(map(repr, SCHEDULE_FUNCTIONS))}")
    if name == "constant":
        check_schedule_arguments("constant_schedule", max_lr=max_lr, warmup=warmup)
        return lambda step: constant_schedule(step, max_lr, warmup)
    if total is None:
        raise ValueError(f"make_schedule: total is required for the {name!r} schedule")
    if name == "wsd":
        check_schedule_arguments("wsd_schedule", max_lr=max_lr, min_lr=min_lr, warmup=warmup, total=total,
                                 decay_fraction=decay_fraction)
        return lambda step: wsd_schedule(step, max_lr, min_lr, warmup, total, decay_fraction)
    schedule = SCHEDULE_FUNCTIONS[name]
    check_schedule_arguments(schedule.__name__, max_lr=max_lr, min_lr=min_lr, warmup=warmup, total=total)
    return lambda step: schedule(step, max_lr, min_lr, warmup, total)
