"""Attention kernels: the jnp reference and `flash_attention`, our Pallas FlashAttention-2.

`flash_attention` checks its inputs (validate.py), then runs the Hopper (Mosaic GPU) kernel where that
module exists, the device is compute capability 9.x, the kernel supports the call and it measured faster
(`triton_is_faster`: not at head_dim 64 over short keys); otherwise the Triton
kernel (triton.py), whose tiles the autotuner (autotune.py) picks. After the Hopper forward, the gradient is
the Hopper backward (mosaic_gpu_backward.py) where it supports the call, else the Triton backward. Both compute what
`attention_reference` computes, except on query rows with no visible key (possible only with segment ids,
or with q_len > kv_len and causal): the kernels return zeros there, the reference a uniform average.
"""

from __future__ import annotations

import jax

from ..platform import compute_device, compute_platform
from .reference import attention_mask, attention_reference
from .triton import (
    BlockSizes,
    KernelConfig,
    flash_attention_backward_triton,
    flash_attention_forward_triton,
    flash_attention_triton,
)
from .validate import validate_attention_inputs

IMPLEMENTATIONS = ("mosaic", "triton")

__all__ = [
    "BlockSizes", "KernelConfig", "attention_mask", "attention_reference", "flash_attention",
    "flash_attention_backward_triton", "flash_attention_forward_triton", "flash_attention_triton",
    "mosaic_unavailable_reason", "validate_attention_inputs",
]


def _mosaic_module():
    """kernels.flash_attention.mosaic_gpu, or None where it is absent or does not import."""
    try:
        from . import mosaic_gpu
    except ImportError:
        return None
    if not (hasattr(mosaic_gpu, "supported") and hasattr(mosaic_gpu, "flash_attention_mosaic")):
        return None
    return mosaic_gpu


def _compute_capability() -> str:
    device = compute_device()
    return getattr(device, "compute_capability", "") if device.platform == "gpu" else ""


def mosaic_unavailable_reason(q, k, v, **masking) -> str | None:
    """Why the Hopper kernel cannot run this call (None when it can)."""
    module = _mosaic_module()
    if module is None:
        return "kernels.flash_attention.mosaic_gpu is not available"
    capability = _compute_capability()
    if not str(capability).startswith("9."):
        return f"the Mosaic GPU kernel needs a Hopper GPU (compute capability 9.x), this is {capability or 'no GPU'!r}"
    return module.supported(q, k, v, **masking)


# The Triton kernels beat the Hopper ones at head_dim 64 over at most this many keys (short tiles leave the
# Hopper pipeline little to overlap): docs/perf.md, "Attention kernels (H200)".
TRITON_FASTER_MAX_KV_LEN_D64 = 1024


def triton_is_faster(q, k) -> bool:
    """Whether "auto" (implementation=None) takes the Triton kernels although the Hopper ones could run."""
    return q.shape[-1] == 64 and k.shape[1] <= TRITON_FASTER_MAX_KV_LEN_D64


def flash_attention(q, k, v, *, causal: bool = True, sliding_window: int | None = None,
                    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                    logit_softcap: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool = False, implementation: str | None = None) -> jax.Array:
    """Differentiable attention softmax(mask(softcap(q k^T / sqrt(head_dim)))) v -> [batch, q_len, heads, head_dim].

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] (heads a multiple of kv_heads);
    masking arguments as kernels.flash_attention.reference.attention_reference. block_sizes (Triton tiles) or
    interpret=True (Pallas interpret mode, for CPUs) select the Triton kernel; implementation "mosaic" /
    "triton" forces one (None: Mosaic where it runs, else Triton).
    """
    validate_attention_inputs(q, k, v, causal=causal, sliding_window=sliding_window, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids, logit_softcap=logit_softcap)
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"flash_attention: implementation must be None, 'mosaic' or 'triton', got {implementation!r}")
    if not interpret and compute_platform(q) != "gpu":
        raise ValueError(f"flash_attention: the kernels need a CUDA GPU, this backend is {compute_platform(q)!r}; "
                         "pass interpret=True to run them in Pallas interpret mode (slow), or use attention_reference")
    masking = dict(causal=causal, sliding_window=sliding_window, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids, logit_softcap=logit_softcap)
    want_mosaic = implementation == "mosaic" or (implementation is None and block_sizes is None and not interpret
                                                 and not triton_is_faster(q, k))
    if want_mosaic:
        reason = mosaic_unavailable_reason(q, k, v, **masking)
        if reason is None:
            return _mosaic_module().flash_attention_mosaic(q, k, v, **masking)
        if implementation == "mosaic":
            raise ValueError(f"flash_attention: implementation='mosaic' cannot run this call: {reason}")
    return flash_attention_triton(q, k, v, block_sizes=block_sizes, interpret=interpret, **masking)
