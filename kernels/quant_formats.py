"""The storage layout of weight-only quantized matrices: formats, bit widths, the NF4 table, code packing.

What the fused dequantize-matmul (kernels/matmul_quant.py) and its reference read, defined here so the kernel
package depends on nothing above it; llmjax.quant.formats (quantization itself) imports these.

4-bit codes are packed along the input axis: byte [i, j] holds row 2i in its low nibble and row 2i+1 in its high
nibble. 3-bit codes: rows 8r .. 8r+7 of a column form a 24-bit word (row 8r + i in bits 3i .. 3i+2) stored as
three byte planes, codes [3 * in / 8, out]: plane p (rows p * in / 8 + r) holds byte p of word r.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4", "int3", "nf4")
BITS = {"int8": 8, "int4": 4, "int3": 3, "nf4": 4}
# How `x @ QuantizedMatrix` runs: the XLA reference (dequantize, then one dot), the fused Pallas kernel, the few-row
# XLA form that CPUs run fastest (kernels/matmul_quant.py, quantized_matvec), or "auto": chosen where it runs.
MATMULS = ("xla", "pallas", "matvec", "auto")

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023; bitsandbytes' table): quantiles of N(0, 1) scaled to
# [-1, 1] with an exact zero, 7 negative and 8 positive levels.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)


class QuantizationError(ValueError):
    """A weight, format or group size that cannot be quantized as asked."""


def pack_4bit(codes: jax.Array) -> jax.Array:
    """uint8 codes < 16 [..., in, out] (in even) -> [..., in / 2, out]: row 2i low nibble, 2i+1 high."""
    codes = codes.astype(jnp.uint8)
    return codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)


def unpack_4bit(packed: jax.Array) -> jax.Array:
    """Inverse of pack_4bit: [..., in / 2, out] -> uint8 [..., in, out]."""
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=-2).reshape(*packed.shape[:-2], packed.shape[-2] * 2, packed.shape[-1])


def pack_3bit(codes: jax.Array) -> jax.Array:
    """uint8 codes < 8 [..., in, out] (in a multiple of 8) -> three byte planes [..., 3 * in / 8, out]."""
    rows = codes.shape[-2]
    eight = codes.astype(jnp.uint32).reshape(*codes.shape[:-2], rows // 8, 8, codes.shape[-1])
    word = sum(eight[..., i, :] << (3 * i) for i in range(8))  # [..., in / 8, out] 24-bit words
    planes = [((word >> (8 * p)) & 0xFF).astype(jnp.uint8) for p in range(3)]
    return jnp.concatenate(planes, axis=-2)


def unpack_3bit(packed: jax.Array) -> jax.Array:
    """Inverse of pack_3bit: [..., 3 * in / 8, out] -> uint8 [..., in, out]."""
    words_per_plane = packed.shape[-2] // 3
    planes = [packed[..., p * words_per_plane:(p + 1) * words_per_plane, :].astype(jnp.uint32) for p in range(3)]
    word = planes[0] | (planes[1] << 8) | (planes[2] << 16)
    codes = jnp.stack([(word >> (3 * i)) & 7 for i in range(8)], axis=-2)  # [..., in / 8, 8, out]
    return codes.reshape(*packed.shape[:-2], words_per_plane * 8, packed.shape[-1]).astype(jnp.uint8)


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Codes one per input row -> the stored layout of `bits`-bit codes."""
    return pack_4bit(codes) if bits == 4 else pack_3bit(codes) if bits == 3 else codes.astype(jnp.uint8)


def unpack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Inverse of pack_codes: the stored layout -> uint8 codes one per input row [..., in, out]."""
    return unpack_4bit(codes) if bits == 4 else unpack_3bit(codes) if bits == 3 else codes


def group_rows(w: jax.Array, group_size: int) -> jax.Array:
    """[*lead, in, out] -> [*lead, groups, group_size, out]: the input rows that share a scale."""
    return w.reshape(*w.shape[:-2], w.shape[-2] // group_size, group_size, w.shape[-1])
