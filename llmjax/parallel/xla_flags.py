"""XLA flags for collective overlap in multi-GPU training, set by the code before JAX starts its backends.

They let XLA's latency-hiding scheduler overlap collectives with compute, move the all-gathers /
reduce-scatters / all-reduces of scanned layers into the loop body one iteration ahead (so layer i's
weights arrive while layer i-1 computes), and combine small collectives into large ones. They only
affect GPU compilation. A flag the user already set in XLA_FLAGS keeps the user's value.
Nothing turns them on by default: they helped one strategy and hurt another (docs/perf.md, "Multi-GPU
scaling"); `python -m experiments bench_scaling --xla-flags` measures them again.
"""

from __future__ import annotations

import os

GPU_TRAINING_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": str(128 << 20),
    "xla_gpu_all_gather_combine_threshold_bytes": str(128 << 20),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(128 << 20),
}


def with_flags(current: str, flags: dict[str, str]) -> str:
    """XLA_FLAGS text with `flags` added, keeping any flag `current` already sets."""
    present = {item.split("=", 1)[0].lstrip("-") for item in current.split()}
    added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join([*current.split(), *added])


def set_gpu_training_flags() -> None:
    """Add GPU_TRAINING_FLAGS to the environment's XLA_FLAGS; call before the first jax.devices()."""
    os.environ["XLA_FLAGS"] = with_flags(os.environ.get("XLA_FLAGS", ""), GPU_TRAINING_FLAGS)
