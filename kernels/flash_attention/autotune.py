"""Tile choice for the Triton flash-attention kernels: per (kernel, device kind, dtype, head_dim, causal,
sequence-length class) a few candidate configs are timed once on the GPU and the fastest is kept, in memory
and in a JSON file ($LLMJAX_CACHE_DIR/flash_attention.json, default ~/.cache/llmjax/), so later processes
skip the timing. In interpret mode or off the GPU: fixed small blocks, no timing.
LLMJAX_FLASH_AUTOTUNE=0 turns timing off and takes each list's first candidate (the candidate lists, with the
device they were tuned on, are data: kernels/tuning/flash_attention.json).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from ..platform import compute_device, compute_platform
from ..tuning import load_tables, table_entry
from .config import KernelConfig, Masking

CACHE_DIR_ENV = "LLMJAX_CACHE_DIR"
AUTOTUNE_ENV = "LLMJAX_FLASH_AUTOTUNE"
CACHE_FILE = "flash_attention.json"
INTERPRET_CONFIG = KernelConfig(block_q=32, block_k=32, num_warps=4, num_stages=1)
KERNELS = ("forward", "dkv", "dq")
TUNING_ELEMENTS = 2**27  # cap on batch * q_len * heads * head_dim of the tuning inputs (256 MiB in bf16)
TIMED_REPEATS = 5


def _configs(rows) -> tuple[KernelConfig, ...]:
    return tuple(KernelConfig(*row) for row in rows)


def half_candidates(tables: dict) -> dict[str, dict[int, tuple[KernelConfig, ...]]]:
    """kernel -> largest head_dim -> configs (bf16 / f16), from the tuning tables."""
    return {which: {int(head_dim): _configs(rows) for head_dim, rows in table_entry(tables, ("half", which),
                                                                                     "flash_attention").items()}
            for which in KERNELS}


def float32_candidates(tables: dict) -> dict[str, tuple[KernelConfig, ...]]:
    """kernel -> configs for float32 (dots without tensor cores: small tiles), from the tuning tables."""
    return {which: _configs(table_entry(tables, ("float32", which), "flash_attention")) for which in KERNELS}


# Candidate tiles per kernel (and largest head_dim for half precision); the first of each list is the default.
# Tuned data, with the device it was tuned on: kernels/tuning/flash_attention.json.
TUNING_TABLES = load_tables("flash_attention")
_HALF_CANDIDATES = half_candidates(TUNING_TABLES)
_FLOAT32_CANDIDATES = float32_candidates(TUNING_TABLES)


def candidates(which: str, head_dim: int, dtype) -> tuple[KernelConfig, ...]:
    """Configs worth timing for kernel `which` ("forward", "dkv", "dq"); the first is the default."""
    if which not in KERNELS:
        raise ValueError(f"which must be one of {KERNELS}, got {which!r}")
    if jnp.dtype(dtype) == jnp.float32:
        return _FLOAT32_CANDIDATES[which]
    by_head_dim = _HALF_CANDIDATES[which]
    return by_head_dim[min(d for d in by_head_dim if d >= min(head_dim, 256))]


def length_class(length: int) -> int:
    """Sequence lengths tune together within a power of two (at least 128)."""
    return max(128, 1 << (max(length, 1) - 1).bit_length())


def tuning_key(which: str, q, k, masking: Masking, device_kind: str) -> str:
    return "|".join([which, device_kind, jnp.dtype(q.dtype).name, f"d{q.shape[-1]}",
                     "causal" if masking.causal else "full", f"q{length_class(masking.q_len)}",
                     f"kv{length_class(masking.kv_len)}"])


def cache_path() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/llmjax").expanduser() / CACHE_FILE


def _read_cache(path: Path) -> dict[str, list[int]]:
    try:
        entries = json.loads(path.read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {key: value for key, value in entries.items() if isinstance(value, list) and len(value) == 4}


def _write_cache(path: Path, key: str, config: KernelConfig) -> None:
    """Merge one entry into the JSON file (re-read first: other processes may have written), atomically."""
    entries = _read_cache(path)
    entries[key] = [config.block_q, config.block_k, config.num_warps, config.num_stages]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump({"version": 1, "entries": entries}, handle, indent=1, sort_keys=True)
        os.replace(handle.name, path)
    except OSError as error:
        warnings.warn(f"flash attention autotune: cannot write {path} ({error}); the choice stays in memory",
                      stacklevel=2)


_memory: dict[str, KernelConfig] = {}
_lock = threading.RLock()  # re-entered: tuning a backward kernel first resolves the forward config


def _on_gpu() -> bool:
    return compute_platform() == "gpu"


def _device_kind() -> str:
    return compute_device().device_kind


def median_seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(TIMED_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tuning_inputs(q, k, masking: Masking):
    """Random q, k, v, d_out of the call's shapes (batch capped) and dtype."""
    batch, q_len, heads, head_dim = q.shape
    batch = max(1, min(batch, TUNING_ELEMENTS // (q_len * heads * head_dim)))
    keys = jax.random.split(jax.random.key(0), 4)
    q_shape, kv_shape = (batch, q_len, heads, head_dim), (batch, masking.kv_len, k.shape[2], head_dim)
    shapes = (q_shape, kv_shape, kv_shape, q_shape)
    return [jax.random.normal(key, shape, q.dtype) for key, shape in zip(keys, shapes)]


def _in_fresh_thread(fn):
    """fn() on a new thread: JAX's trace state is thread-local, so there the kernels run on concrete arrays
    even when the caller is in the middle of tracing a jit."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def choose_fastest(configs, time_config) -> tuple[KernelConfig, dict[KernelConfig, float]]:
    """The config with the least time_config(config) seconds; configs that fail to compile or run are skipped."""
    times, errors = {}, []
    for config in configs:
        try:
            times[config] = time_config(config)
        except Exception as error:  # a config that does not fit (shared memory, registers) fails to compile
            errors.append(f"{config}: {type(error).__name__}: {str(error)[:200]}")
    if not times:
        raise RuntimeError("flash attention autotune: no candidate config ran:\n" + "\n".join(errors))
    return min(times, key=times.get), times


def config_for(which: str, q, k, masking: Masking, *, interpret: bool = False, time_candidate=None) -> KernelConfig:
    """The config of kernel `which` for these inputs: fixed in interpret mode or off the GPU; else from the
    memory cache, the JSON file, or timing the candidates now (once per key) with
    time_candidate(which, config, q, k, masking, forward_config) -> seconds (the kernels' own timer,
    kernels.flash_attention.triton.time_candidate, passed in: the tuner does not import the kernels it tunes)."""
    if interpret or not _on_gpu():
        return INTERPRET_CONFIG
    configs = candidates(which, q.shape[-1], q.dtype)
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return configs[0]
    key = tuning_key(which, q, k, masking, _device_kind())
    with _lock:
        if key in _memory:
            return _memory[key]
        path = cache_path()
        stored = _read_cache(path).get(key)
        if stored is not None:
            _memory[key] = KernelConfig(*stored)
            return _memory[key]
        if time_candidate is None:
            raise ValueError(f"flash attention autotune: no cached config for {key}; pass time_candidate (the "
                             "kernels' timer) to time the candidates")
        forward = None if which == "forward" else config_for("forward", q, k, masking, time_candidate=time_candidate)

        def time_config(config):
            return time_candidate(which, config, q, k, masking, forward)

        best, _ = _in_fresh_thread(lambda: choose_fastest(configs, time_config))
        _memory[key] = best
        _write_cache(path, key, best)
        return best
