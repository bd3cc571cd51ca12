"""RMSNorm forward as a raw Triton kernel called through `jax_triton.triton_call` (a developer tool:
not installed; tools/jax_triton_check.py times it).

The same operation as `llmjax.kernels.norms.rms_norm_reference` (the reference) and the Pallas kernel in
`llmjax.kernels.norms`: written in Triton's own language to compare the two ways of bringing a Triton
kernel into JAX. One program normalizes one row; statistics in float32. Forward only.
"""

from __future__ import annotations

import functools

import jax
import numpy as np


@functools.cache
def _kernel():
    """The @triton.jit kernel, built on first use (triton is only needed where it runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rows(x_ptr, scale_ptr, out_ptr, n_cols: tl.constexpr, eps: tl.constexpr, block: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.arange(0, block)
        inside = columns < n_cols
        x = tl.load(x_ptr + row * n_cols + columns, mask=inside, other=0.0).to(tl.float32)
        inverse_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        scale = tl.load(scale_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + columns, (x * inverse_rms * scale).to(out_ptr.dtype.element_ty), mask=inside)

    return rms_norm_rows


def import_jax_triton():
    """jax_triton, made to work with triton 3.6 (the lent GPU's; jax-triton 0.4.1 asks for >= 3.7).

    jax-triton 0.4.1 imports `TMA_TF32` from `triton.backends.nvidia.driver` in the same `try` as
    the NVIDIA compiler; triton 3.6 lacks that one constant, so the import fails and jax-triton
    silently replaces the whole NVIDIA backend with stubs (then `make_backend` fails on
    "'_Stub' object has no attribute 'backend'"). The constant only matters for TMA descriptors,
    which these kernels do not use; defining it when absent restores the real backend.
    """
    import triton.backends.nvidia.driver as nvidia_driver

    for name, value in (("TMA_TF32", 0), ("TMA_DTYPE_DEVICE_TO_HOST", {})):
        if not hasattr(nvidia_driver, name):
            setattr(nvidia_driver, name, value)
    import jax_triton

    return jax_triton


def rms_norm_triton(x: jax.Array, scale: jax.Array, eps: float = 1e-6, *, num_warps: int = 8) -> jax.Array:
    """x [..., d] / rms(x) * scale [d], through jax_triton (needs a CUDA GPU, jax-triton and triton)."""
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"scale has shape {scale.shape}, expected ({x.shape[-1]},) to match x's last axis")
    jax_triton = import_jax_triton()
    d = x.shape[-1]
    rows = int(np.prod(x.shape[:-1]))
    out = jax_triton.triton_call(
        x.reshape(rows, d), scale,
        kernel=_kernel(),
        out_shape=jax.ShapeDtypeStruct((rows, d), x.dtype),
        grid=(rows,),
        num_warps=num_warps,
        n_cols=d, eps=float(eps), block=int(2 ** int(np.ceil(np.log2(d)))),
    )
    return out.reshape(x.shape)
