"""The device a computation is compiled for, read one way everywhere, so that which algorithm runs (a Pallas
kernel or its reference, interpret mode, tile sizes) follows where the computation is placed, not the process's
first device.

In order: the first concrete array among the inputs given (its device); else the device `jax.default_device`
names (a `with jax.default_device(d):` block or the jax_default_device setting, which is part of jit's cache key,
so a function traced under it is traced again elsewhere); else the default backend's first device.

`compiler_options(platform)`: the XLA options a program compiled for that platform is given (jax.jit's
compiler_options), where XLA's defaults measured slower (docs/perf.md, "CPU decoding").
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


# On CPUs: dots through XLA's own runtime (Eigen) rather than YNNPACK fusions, which ran a 48-row prefill GEMM at
# half the speed and attention's small dots slower; and 512-bit vectors where the CPU has them (AVX-512; LLVM's
# default stays at 256 bits), which the fused dequantizing loops of kernels/matmul_quant.quantized_matvec use.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_prefer_vector_width": 512}


def compiler_options(platform: str) -> dict:
    """XLA compiler options for a program compiled for `platform` (a copy; empty where the defaults are kept)."""
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else {}
