"""A CPU int8 matvec as an XLA FFI custom call (kernels/cpu/q8_matvec.cc): llama.cpp's q8_0 dot for decoding.

    packed = pack_int8_rows(qm)   # once: symmetric int8 QuantizedMatrix [in, out] -> codes int8 [out, in] (packed)
    y = q8_matvec(x, packed)      # x [..., in] -> [..., out]; or x @ packed (its matmul is "cpu")

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
import dataclasses
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

from .matmul_quant import QuantizedMatrix, quantized_matvec
from .platform import compute_platform
from .quant_formats import QuantizationError

__all__ = ["BLOCK", "available", "can_pack", "cache_dir", "library_path", "pack_int8_rows", "q8_matvec",
           "unpack_int8_rows"]

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


def can_pack(qm: QuantizedMatrix) -> bool:
    """A symmetric int8 matrix (no zero points, no offsets) of one [in, out] matrix, in and group multiples of 32."""
    return (isinstance(qm, QuantizedMatrix) and not qm.cpu_packed and qm.format == "int8" and qm.zeros is None
            and qm.offsets is None and not qm.lead_shape and qm.group_size % BLOCK == 0
            and qm.in_features % BLOCK == 0)


@jax.jit
def _pack(codes, scales):
    codes_s8 = (codes.astype(jnp.int16) - ZERO).astype(jnp.int8).T  # [out, in]
    return codes_s8, scales.astype(jnp.float32).T  # [out, groups]


def pack_int8_rows(qm: QuantizedMatrix) -> QuantizedMatrix:
    """The matrix in the kernel's layout: codes int8 [out, in] (code - 128), scales float32 [out, groups], matmul
    "cpu" and cpu_packed set (shape, group size unchanged: it still stands for the same [in, out] weight)."""
    if not can_pack(qm):
        raise QuantizationError(
            f"pack_int8_rows takes one symmetric int8 matrix with in and group multiples of {BLOCK}; got format "
            f"{qm.format!r}, group {qm.group_size}, in {qm.in_features}, leading axes {qm.lead_shape}"
            f"{', zero points' if qm.zeros is not None else ''}{', offsets' if qm.offsets is not None else ''}"
            f"{', already packed' if qm.cpu_packed else ''}")
    codes, scales = _pack(qm.codes, qm.scales)
    return dataclasses.replace(qm, codes=codes, scales=scales, matmul="cpu", cpu_packed=True)


def unpack_int8_rows(packed: QuantizedMatrix) -> QuantizedMatrix:
    """pack_int8_rows undone: uint8 codes [in, out], float16 scales [groups, out] (exact: they came from float16)."""
    codes = (packed.codes.T.astype(jnp.int16) + ZERO).astype(jnp.uint8)
    return dataclasses.replace(packed, codes=codes, scales=packed.scales.T.astype(jnp.float16), matmul="matvec",
                               cpu_packed=False)


def q8_matvec(x: jax.Array, packed: QuantizedMatrix) -> jax.Array:
    """x [..., in] @ the packed matrix -> [..., out] in x's dtype (float32 arithmetic, x quantized to int8 blocks of
    32). Where the kernel is not available or x is not on a CPU: quantized_matvec on the unpacked matrix."""
    if not packed.cpu_packed:
        raise QuantizationError("q8_matvec takes a matrix from pack_int8_rows (cpu_packed); pack it first")
    k, n = packed.in_features, packed.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the quantized matrix expects {k}")
    if compute_platform(x) != "cpu" or not available():
        return quantized_matvec(x, unpack_int8_rows(packed))
    x2d = x.reshape(-1, k).astype(jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2d.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x2d, packed.codes, packed.scales).reshape(*x.shape[:-1], n).astype(x.dtype)


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
