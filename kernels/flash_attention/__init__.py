"""Attention kernels: the jnp reference (and, per lowering, the Pallas flash-attention kernels)."""

from kernels.flash_attention.reference import attention_mask, attention_reference

__all__ = ["attention_mask", "attention_reference"]
