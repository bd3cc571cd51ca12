"""Weight-only quantization formats: int8, int4 (two per byte), int3, and NF4 with double quantization.

A weight is seen as a matrix [in, out] (the contraction axes flattened first, e.g. attention's
o kernel [heads, head_dim, d_model] is [heads * head_dim, d_model]), optionally with leading
stacked-layer axes. Scales are per output channel and per group of `group_size` consecutive input
rows (group_size=None: one group spanning the whole input, i.e. per-channel):

    int8   symmetric:  w ~ (code - 128) * scale          scale = absmax / 127, codes uint8
    int4   asymmetric: w ~ (code - zero) * scale         scale = (max - min) / 15, zero a uint8 per group
    int3   asymmetric, like int4 with 8 levels, eight codes packed into three bytes
    nf4    QLoRA's NormalFloat4: w ~ NF4[code] * absmax, codes packed two per byte; the absmax
           scales themselves quantized to int8 in blocks of up to 256 after subtracting their mean
           ("double quantization": 8 + 32 / 256 bits per group instead of 32)

4-bit codes are packed along the input axis: byte [i, j] holds row 2i in its low nibble and row 2i+1
in its high nibble. 3-bit codes: rows 8r .. 8r+7 of a column form a 24-bit word (row 8r + i in bits
3i .. 3i+2) stored as three byte planes, codes [3 * in / 8, out]: plane p (rows p * in / 8 + r) holds
byte p of word r. `QuantizedMatrix` is a pytree (arrays are children, the format is static), so it
passes through jit / scan / orbax like any parameter, and `x @ qm` dequantizes on the fly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4", "int3", "nf4")
BITS = {"int8": 8, "int4": 4, "int3": 3, "nf4": 4}
NF4_DEFAULT_GROUP = 64  # QLoRA's block size
DOUBLE_QUANT_BLOCK = 256  # QLoRA's block size for quantizing the scales

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023; bitsandbytes' table): quantiles of N(0, 1) scaled to
# [-1, 1] with an exact zero, 7 negative and 8 positive levels.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)


class QuantizationError(ValueError):
    """A weight, format or group size that cannot be quantized as asked."""


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized weight: codes and scales as arrays, the format as static metadata.

    codes   uint8 [*lead, in, out]; packed [*lead, in / 2, out] for 4-bit formats, [*lead, 3 * in / 8, out] for int3
    scales  float16 [*lead, groups, out] (int formats; None for nf4, whose scales are double-quantized)
    zeros   uint8 [*lead, groups, out] zero points (asymmetric int formats), else None
    scale_codes / scale_blocks / scale_mean: nf4's double-quantized absmax scales:
            absmax ~ scale_codes [*lead, groups, out] (int8) * scale_blocks [*lead, groups, out / block]
            + scale_mean [*lead, 1, 1]
    """

    codes: jax.Array
    scales: jax.Array | None = None
    zeros: jax.Array | None = None
    scale_codes: jax.Array | None = None
    scale_blocks: jax.Array | None = None
    scale_mean: jax.Array | None = None
    format: str = dataclasses.field(default="int8", metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    shape: tuple = dataclasses.field(default=(), metadata=dict(static=True))  # one matrix's original weight shape
    in_dims: int = dataclasses.field(default=1, metadata=dict(static=True))  # leading axes of `shape` contracted
    matmul: str = dataclasses.field(default="xla", metadata=dict(static=True))  # `x @ self`: "xla" or "pallas"

    @property
    def bits(self) -> int:
        return BITS[self.format]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[: self.in_dims])

    @property
    def out_features(self) -> int:
        return math.prod(self.shape[self.in_dims:])

    @property
    def lead_shape(self) -> tuple:
        return tuple(self.codes.shape[:-2])

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes, scales, zero points, double-quantization constants)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        """x [..., in] @ self: the XLA reference (dequantize, then one matmul), or with matmul="pallas" the
        fused kernel (kernels.matmul_quant)."""
        if self.matmul == "pallas":
            from llmjax.kernels.matmul_quant import quantized_matmul_pallas

            return quantized_matmul_pallas(x, self)
        return quantized_matmul(x, self)

    def with_matmul(self, matmul: str) -> QuantizedMatrix:
        if matmul not in ("xla", "pallas"):
            raise QuantizationError(f"matmul={matmul!r}: expected 'xla' or 'pallas'")
        return dataclasses.replace(self, matmul=matmul)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise QuantizationError(f"unknown quantization format {fmt!r}; expected one of {', '.join(FORMATS)}")


def resolve_group_size(fmt: str, in_features: int, group_size: int | None) -> int:
    """The group size in input rows (None or -1: per-channel, one group over the whole input; nf4's
    default is 64). Raises when it does not divide the input dimension."""
    if group_size is None and fmt == "nf4":
        group_size = NF4_DEFAULT_GROUP if in_features % NF4_DEFAULT_GROUP == 0 else in_features
    if group_size is None or group_size == -1:
        group_size = in_features
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise QuantizationError(f"group size {group_size!r}: must be a positive integer, or None / -1 for per-channel")
    if in_features % group_size:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise QuantizationError(
            f"group size {group_size} does not divide the input dimension {in_features}; choose a divisor "
            f"({', '.join(map(str, divisors)) or 'none of 32, 64, 128, 256 divides it'}) or per-channel (-1)"
        )
    if BITS[fmt] == 4 and group_size % 2:
        raise QuantizationError(f"{fmt} packs two input rows per byte: group size {group_size} must be even")
    if BITS[fmt] == 3 and group_size % 8:
        raise QuantizationError(f"int3 packs eight input rows into three bytes: group size {group_size} must be a "
                                f"multiple of 8")
    return int(group_size)


def as_matrix(w: jax.Array, in_dims: int, lead_dims: int = 0) -> jax.Array:
    """[*lead, *in_axes, *out_axes] -> [*lead, in, out]."""
    lead, rest = w.shape[:lead_dims], w.shape[lead_dims:]
    return w.reshape(*lead, math.prod(rest[:in_dims]), math.prod(rest[in_dims:]))


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


def _grouped(w: jax.Array, group_size: int) -> jax.Array:
    """[*lead, in, out] -> [*lead, groups, group_size, out]."""
    return w.reshape(*w.shape[:-2], w.shape[-2] // group_size, group_size, w.shape[-1])


def int_quant_params(w_grouped: jax.Array, bits: int, symmetric: bool):
    """(scale, zero) per [*lead, groups, 1, out] for grouped weights [*lead, groups, group, out]."""
    if symmetric:
        levels = 2 ** (bits - 1) - 1
        scale = jnp.abs(w_grouped).max(axis=-2, keepdims=True) / levels
        zero = jnp.full_like(scale, 2 ** (bits - 1))
    else:
        low = jnp.minimum(w_grouped.min(axis=-2, keepdims=True), 0.0)
        high = jnp.maximum(w_grouped.max(axis=-2, keepdims=True), 0.0)
        scale = (high - low) / (2**bits - 1)
        zero = jnp.round(-low / jnp.where(scale == 0, 1.0, scale))
    return scale, zero


def quantize_with(w, scale, zero, bits: int):
    """Codes in [0, 2^bits) of w under the given scale / zero point (broadcasting)."""
    return jnp.clip(jnp.round(w / jnp.where(scale == 0, 1.0, scale)) + zero, 0, 2**bits - 1)


def quantize(w: jax.Array, fmt: str, group_size: int | None = None, *, in_dims: int = 1, lead_dims: int = 0,
             symmetric: bool | None = None) -> QuantizedMatrix:
    """Quantize a weight whose first `lead_dims` axes are stacked layers and whose next `in_dims`
    axes are contracted with the input. Round-to-nearest (GPTQ lives in llmjax.quant.gptq).

    symmetric: int formats only (default: int8 symmetric, int4 / int3 asymmetric with a zero point).
    """
    _check_format(fmt)
    shape = tuple(w.shape[lead_dims:])
    matrix = as_matrix(jnp.asarray(w, jnp.float32), in_dims, lead_dims)  # [*lead, in, out]
    in_features = matrix.shape[-2]
    group_size = resolve_group_size(fmt, in_features, group_size)
    grouped = _grouped(matrix, group_size)
    meta = dict(format=fmt, group_size=group_size, shape=shape, in_dims=in_dims)
    if fmt == "nf4":
        absmax = jnp.abs(grouped).max(axis=-2, keepdims=True)  # [*lead, groups, 1, out]
        normalized = grouped / jnp.where(absmax == 0, 1.0, absmax)
        codes = jnp.argmin(jnp.abs(normalized[..., None] - NF4_CODEBOOK), axis=-1).astype(jnp.uint8)
        codes = pack_4bit(codes.reshape(matrix.shape))
        return QuantizedMatrix(codes, **double_quantize(absmax[..., 0, :]), **meta)
    bits = BITS[fmt]
    symmetric = (bits == 8) if symmetric is None else symmetric
    scale, zero = int_quant_params(grouped, bits, symmetric)
    scale = scale.astype(jnp.float16).astype(jnp.float32)  # quantize against the scale that is stored
    codes = pack_codes(quantize_with(grouped, scale, zero, bits).astype(jnp.uint8).reshape(matrix.shape), bits)
    return QuantizedMatrix(codes, scales=scale[..., 0, :].astype(jnp.float16),
                           zeros=None if symmetric else zero[..., 0, :].astype(jnp.uint8), **meta)


def _block_size(out_features: int) -> int:
    """The largest divisor of out_features up to DOUBLE_QUANT_BLOCK."""
    return max(b for b in range(1, min(DOUBLE_QUANT_BLOCK, out_features) + 1) if out_features % b == 0)


def double_quantize(absmax: jax.Array) -> dict:
    """NF4's scales [*lead, groups, out] -> int8 codes with one float32 scale per block of the output
    axis, after subtracting the mean per matrix (QLoRA's double quantization)."""
    mean = absmax.mean(axis=(-2, -1), keepdims=True)  # [*lead, 1, 1]
    centered = absmax - mean
    block = _block_size(absmax.shape[-1])
    blocks = centered.reshape(*centered.shape[:-1], -1, block)  # [*lead, groups, out / block, block]
    block_scale = jnp.abs(blocks).max(axis=-1, keepdims=True) / 127
    codes = jnp.round(blocks / jnp.where(block_scale == 0, 1.0, block_scale)).astype(jnp.int8)
    return dict(scale_codes=codes.reshape(centered.shape), scale_blocks=block_scale[..., 0], scale_mean=mean)


def nf4_absmax(qm: QuantizedMatrix) -> jax.Array:
    """NF4's dequantized absmax scales [*lead, groups, out] (float32)."""
    blocks = qm.scale_codes.reshape(*qm.scale_codes.shape[:-1], qm.scale_blocks.shape[-1], -1)
    return (blocks.astype(jnp.float32) * qm.scale_blocks[..., None]).reshape(qm.scale_codes.shape) + qm.scale_mean


def unpacked_codes(qm: QuantizedMatrix) -> jax.Array:
    """Codes one per input row: uint8 [*lead, in, out]."""
    return unpack_4bit(qm.codes) if qm.bits == 4 else unpack_3bit(qm.codes) if qm.bits == 3 else qm.codes


def group_scales_and_zeros(qm: QuantizedMatrix) -> tuple[jax.Array, jax.Array | None]:
    """(scale [*lead, groups, out] float32, zero point [*lead, groups, out] float32 or None for nf4)."""
    if qm.format == "nf4":
        return nf4_absmax(qm), None
    zero = (jnp.full(qm.scales.shape, 2 ** (qm.bits - 1), jnp.float32) if qm.zeros is None
            else qm.zeros.astype(jnp.float32))
    return qm.scales.astype(jnp.float32), zero


def dequantize_matrix(qm: QuantizedMatrix, dtype=jnp.float32) -> jax.Array:
    """The [*lead, in, out] matrix the codes stand for."""
    codes = unpacked_codes(qm)
    scale, zero = group_scales_and_zeros(qm)
    grouped = _grouped(codes, qm.group_size)  # [*lead, groups, group, out]
    if qm.format == "nf4":
        values = jnp.asarray(NF4_CODEBOOK)[grouped.astype(jnp.int32)] * scale[..., None, :]
    else:
        values = (grouped.astype(jnp.float32) - zero[..., None, :]) * scale[..., None, :]
    return values.reshape(codes.shape).astype(dtype)


def dequantize(qm: QuantizedMatrix, dtype=jnp.float32) -> jax.Array:
    """The weight in its original shape [*lead, *shape]."""
    return dequantize_matrix(qm, dtype).reshape(*qm.lead_shape, *qm.shape)


def quantized_matmul(x: jax.Array, qm: QuantizedMatrix) -> jax.Array:
    """x [..., in] @ the quantized [in, out] matrix -> [..., out] in x's dtype: the XLA reference,
    which dequantizes the whole matrix and lets XLA fuse the conversion into the dot where it can."""
    if qm.lead_shape:
        raise QuantizationError(f"quantized_matmul takes one matrix; this one has leading axes {qm.lead_shape}")
    return jnp.matmul(x, dequantize_matrix(qm, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def concatenate_outputs(matrices: list[QuantizedMatrix]) -> QuantizedMatrix:
    """Matrices sharing input, format and group size, side by side along the output axis (e.g. q|k|v
    fused for decoding). Exact for int formats (every output column is quantized on its own); nf4's int8
    scale constants are re-blocked, which moves a scale by well under 1% (far below NF4's own error). 2-D result."""
    first = matrices[0]
    if any(m.format != first.format or m.group_size != first.group_size or m.in_features != first.in_features
           or m.lead_shape != first.lead_shape for m in matrices):
        raise QuantizationError("only matrices of one format, group size and input dimension concatenate")
    if first.scale_codes is not None:  # double-quantization constants are per matrix: re-block them
        absmax = jnp.concatenate([nf4_absmax(m) for m in matrices], axis=-1)
        parts = double_quantize(absmax)
    else:
        cat = lambda name: (None if getattr(first, name) is None  # noqa: E731
                            else jnp.concatenate([getattr(m, name) for m in matrices], axis=-1))
        parts = dict(scales=cat("scales"), zeros=cat("zeros"))
    codes = jnp.concatenate([m.codes for m in matrices], axis=-1)
    out = sum(m.out_features for m in matrices)
    return QuantizedMatrix(codes, **parts, format=first.format, group_size=first.group_size,
                           shape=(first.in_features, out), in_dims=1)
