"""A CPU int8 matvec as an XLA FFI custom call (kernels/cpu/q8_matvec.cc): llama.cpp's q8_0 dot for decoding.

    packed = pack_int8_rows(qm)  # kernels.matmul_quant, once: int8 [in, out] -> codes int8 [out, in] (cpu_packed)
    y = q8_matvec(x, packed)     # kernels.matmul_quant: x [..., in] -> [..., out]; or x @ packed (matmul "cpu")
    y2d = int8_rows_matvec(x2d, packed.codes, packed.scales)   # this module: the custom call itself

XLA on a CPU has no fast int8 dot, and `kernels.matmul_quant.quantized_matvec` converts every uint8 code to
float32 (compute-bound at a few GB/s of codes). The kernel quantizes each row of x to int8 blocks of 32 (one float
scale per block, max|x| / 127, as llama.cpp's q8_0 activations), sums a block's products in integers (AVX2:
maddubs / madd, a plain C++ loop without AVX2) and adds scale_w * scale_x * sum per block in float32; output rows
are split over the caller and XLA's intra-op thread pool (the FFI's ThreadPool: no threads of its own; OpenMP's,
spinning between calls, took the cores from XLA's). The weight codes are stored transposed, the input axis
contiguous, with the scales as float32 [out, groups] (`pack_int8_rows`, done once by
llmjax.quant.model.quantized_decode_params).

The shared library is compiled on first use with the system C++ compiler (`COMPILER`, `FLAGS`) into a per-user
cache folder (`cache_dir()`), named by a hash of the source, the flags, the jax version and the CPU, written atomically;
then loaded with ctypes and registered as the FFI target `TARGET`. `available()` says whether that worked (no
compiler, a compile error, not a CPU: False, with one warning); `q8_matvec` then computes the same product with
`quantized_matvec` on the unpacked matrix.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


__all__ = ["BLOCK", "ZERO", "available", "cache_dir", "int8_rows_matvec", "library_path", "reference"]

SOURCE = Path(__file__).parent / "cpu" / "q8_matvec.cc"
COMPILER = os.environ.get("LLMJAX_CXX", "c++")  # the C++ compiler command (tests monkeypatch it)
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
TARGET = "llmjax_q8_matvec"
BLOCK = 32  # activation / integer-dot block (the group size must be a multiple)
ZERO = 128  # symmetric int8 codes are uint8 with this zero point (kernels.matmul_quant.group_parameters)


def cache_dir() -> Path:
    """Per-user folder for the compiled library: $LLMJAX_KERNEL_CACHE, else $XDG_CACHE_HOME/llmjax/cpu_kernels,
    else ~/.cache/llmjax/cpu_kernels."""
    if os.environ.get("LLMJAX_KERNEL_CACHE"):
        return Path(os.environ["LLMJAX_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmjax" / "cpu_kernels"


def _command(output: Path) -> list[str]:
    return [*shlex.split(COMPILER), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(output)]


def cpu_signature() -> str:
    """The CPU's model name and instruction-set flags (Linux's /proc/cpuinfo; the platform's processor elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor()
    return "|".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def library_path() -> Path:
    """Where the library for this source, compiler, flags, jax version and CPU lives (compiled or not): -march=native
    code from one CPU may not run on another that shares the home folder."""
    key = hashlib.sha256(SOURCE.read_bytes() + repr((COMPILER, FLAGS, jax.__version__, cpu_signature())).encode()
                         ).hexdigest()[:16]
    return cache_dir() / f"q8_matvec-{key}.so"


def _compile(path: Path) -> None:
    """Compile into a temporary file next to `path`, then rename (another process may be compiling too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run(_command(Path(tmp)), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{COMPILER} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_REGISTERED: set[str] = set()  # paths of libraries registered under TARGET in this process


@functools.cache
def _load() -> bool:
    """Compile (if not cached), load and register the kernel once; False (with one warning) if anything fails."""
    try:
        path = library_path()
        if not path.exists():
            _compile(path)
        library = ctypes.cdll.LoadLibrary(str(path))
        if not _REGISTERED:  # XLA keeps the first registration of a name
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Q8Matvec), platform="cpu")
            _REGISTERED.add(str(path))
        return True
    except (OSError, RuntimeError, FileNotFoundError, subprocess.SubprocessError) as error:
        warnings.warn(f"CPU int8 matvec kernel unavailable (falling back to quantized_matvec): {error}", stacklevel=3)
        return False


def available() -> bool:
    """Whether the compiled kernel can run here (compiled, loaded and registered; the CPU backend exists)."""
    return "cpu" in {d.platform for d in jax.devices("cpu")} and _load()


def int8_rows_matvec(x2d: jax.Array, codes: jax.Array, scales: jax.Array) -> jax.Array:
    """The custom call: x2d [rows, in] float32 @ the packed weight (codes int8 [out, in] = code - 128, scales float32
    [out, groups]) -> [rows, out] float32, x quantized to int8 blocks of 32. Only where `available()`."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2d.shape[0], codes.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x2d.astype(jnp.float32), codes, scales)


def reference(x: np.ndarray, packed_codes: np.ndarray, packed_scales: np.ndarray) -> np.ndarray:
    """The kernel's math in NumPy: x [rows, in] quantized in float32 exactly as the C++ does, dots in float64."""
    x = np.asarray(x, np.float32)
    rows, k = x.shape
    blocks = x.reshape(rows, k // BLOCK, BLOCK)
    d = np.abs(blocks).max(-1) / np.float32(127)  # [rows, blocks] float32
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    xq = np.rint(blocks * inv[..., None]).astype(np.float64)  # round half to even, as nearbyint
    w = np.asarray(packed_codes, np.float64).reshape(packed_codes.shape[0], k // BLOCK, BLOCK)  # [out, blocks, 32]
    per_group = k // packed_scales.shape[1] // BLOCK
    ws = np.repeat(np.asarray(packed_scales, np.float64), per_group, axis=1)  # [out, blocks]
    sums = np.einsum("rbi,obi->rob", xq, w)  # [rows, out, blocks]
    return np.einsum("rob,rb,ob->ro", sums, d.astype(np.float64), ws)
