"""The device a computation is compiled for, read one way everywhere, so that which algorithm runs (a Pallas
kernel or its reference, interpret mode, tile sizes) follows where the computation is placed, not the process's
first device.

In order: the first concrete array among the inputs given (its device); else the device `jax.default_device`
names (a `with jax.default_device(d):` block or the jax_default_device setting, which is part of jit's cache key,
so a function traced under it is traced again elsewhere); else the default backend's first device.
"""

from __future__ import annotations

import jax


def compute_device(*inputs) -> jax.Device:
    """The device computations on `inputs` (any pytrees; tracers are skipped) are compiled for."""
    for leaf in jax.tree.leaves(inputs):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            return min(leaf.devices(), key=lambda device: device.id)
    default = jax.config.jax_default_device
    if isinstance(default, str):  # a platform name: jax.default_device("cpu")
        return jax.devices(default)[0]
    return default if default is not None else jax.devices()[0]


def compute_platform(*inputs) -> str:
    """"gpu", "cpu", "tpu"...: the platform of compute_device(*inputs)."""
    return compute_device(*inputs).platform
