"""Why jax is not using the NVIDIA GPU this machine has, in one line, so that a run never falls back to the CPU
silently.

`gpu_unused_reason()` is cheap and never forces jax to pick its devices: the experiments set XLA_FLAGS and call
`jax.distributed.initialize` before jax's first device query, so a check made ahead of them must not make that query
itself. It therefore answers from what can be known beforehand (nvidia-smi, the installed CUDA plugin, JAX_PLATFORMS)
and reads jax's backend only once jax has started one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import subprocess
import sys

# The distributions that give jaxlib its CUDA backend (what jax[cuda13] / jax[cuda12] install).
CUDA_PLUGIN_DISTRIBUTIONS = ("jax-cuda13-plugin", "jax-cuda12-plugin")
NVIDIA_SMI_TIMEOUT_S = 10.0
GPU_PLATFORM_NAMES = {"cuda", "gpu"}  # the JAX_PLATFORMS entries that let jax use an NVIDIA GPU


def visible_nvidia_gpus() -> int:
    """How many GPUs `nvidia-smi -L` lists; 0 when there is no nvidia-smi on PATH or it fails (no driver)."""
    return _count_listed_gpus(shutil.which("nvidia-smi"))


@functools.lru_cache(maxsize=None)
def _count_listed_gpus(nvidia_smi: str | None) -> int:
    """GPUs listed by this nvidia-smi executable (one call per executable per process: the answer is cached)."""
    if nvidia_smi is None:
        return 0
    try:
        listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return 0
    if listing.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def installed_cuda_plugin() -> str | None:
    """'jax-cuda13-plugin 0.11.2' (the first CUDA plugin of jaxlib that is installed), else None."""
    for name in CUDA_PLUGIN_DISTRIBUTIONS:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def started_jax_backend() -> str | None:
    """jax's default backend ('gpu', 'cpu', ...) if jax has already started its backends, else None: asking
    jax.default_backend() would start them, too early for the XLA_FLAGS and distributed set-up of a run."""
    if "jax" not in sys.modules:
        return None
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        return None
    import jax

    return jax.default_backend()


def _gpus(count: int) -> str:
    return f"{count} GPU" if count == 1 else f"{count} GPUs"


def gpu_unused_reason() -> str | None:
    """One line saying why jax does not (or will not) use the NVIDIA GPU that nvidia-smi sees; None when it does, when
    there is no GPU to use, or when that cannot be told yet (jax not started and nothing stands in its way).

    Never raises: a failure of the check itself is not worth stopping a run for."""
    try:
        return _gpu_unused_reason()
    except Exception:  # noqa: BLE001  (a diagnostic only)
        return None


def _gpu_unused_reason() -> str | None:
    count = visible_nvidia_gpus()
    if count == 0:
        return None
    plugin = installed_cuda_plugin()
    if plugin is None:
        return (f"nvidia-smi sees {_gpus(count)} but jax has no CUDA plugin installed: run ./install.sh (it picks "
                f"the gpu extra) or pip install 'llmjax[gpu]'")
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms and not GPU_PLATFORM_NAMES & {name.strip().lower() for name in platforms.split(",")}:
        return (f"nvidia-smi sees {_gpus(count)} and {plugin} is installed, but JAX_PLATFORMS={platforms} keeps jax "
                f"off the GPU: unset JAX_PLATFORMS (or add cuda) to use it")
    backend = started_jax_backend()
    if backend is None or backend == "gpu":
        return None
    return (f"nvidia-smi sees {_gpus(count)} and {plugin} is installed, but jax runs on {backend}: CUDA failed to "
            f"initialize (often a driver too old for the plugin's CUDA; see jax's warning and nvidia-smi's driver "
            f"version)")
