"""Weight-only quantization formats: int8, int4 (two per byte), int3, and NF4 with double quantization.

A weight is seen as a matrix [in, out] (the contraction axes flattened first, e.g. attention's
o kernel [heads, head_dim, d_model] is [heads * head_dim, d_model]), optionally with leading
stacked-layer axes. Scales are per output channel and per group of `group_size` consecutive input
rows (group_size=None: one group spanning the whole input, i.e. per-channel):

    int8   symmetric:  w ~ (code - 128) * scale          scale = absmax / 127, codes uint8
    int4   asymmetric: w ~ (code - zero) * scale         scale = (max - min) / 15, zero a uint8 per group
    int3   asymmetric, like int4 with 8 levels, eight codes packed into three bytes
    int*   with offsets (no zero points): w = code * scale + offset, computed in float32 in that order,
           offset a float16 per group (GGUF's Q4_1 / K-quant "min" forms, imported by llmjax.io.gguf;
           `quantize` does not produce it)
    nf4    QLoRA's NormalFloat4: w ~ NF4[code] * absmax, codes packed two per byte; the absmax
           scales themselves quantized to int8 in blocks of up to 256 after subtracting their mean
           ("double quantization": 8 + 32 / 256 bits per group instead of 32)

4-bit codes are packed along the input axis: byte [i, j] holds row 2i in its low nibble and row 2i+1
in its high nibble. 3-bit codes: rows 8r .. 8r+7 of a column form a 24-bit word (row 8r + i in bits
3i .. 3i+2) stored as three byte planes, codes [3 * in / 8, out]: plane p (rows p * in / 8 + r) holds
byte p of word r. `QuantizedMatrix` is a pytree (arrays are children, the format is static), so it
passes through jit / scan / orbax like any parameter, and `x @ qm` dequantizes on the fly.

The storage layout (formats, the NF4 table, packing) and `QuantizedMatrix` with its dequantization and the
reference matmul are defined in the kernel package (kernels/quant_formats.py, kernels/matmul_quant.py), which
imports nothing from llmjax; this module quantizes into them and re-exports their names.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels.matmul_quant import (QuantizedMatrix, dequantize, dequantize_matrix, group_parameters,
                                         nf4_absmax, quantized_matmul, unpacked_codes)
from llmjax.kernels.quant_formats import (BITS, FORMATS, NF4_CODEBOOK, QuantizationError, group_rows, pack_3bit,
                                          pack_4bit, pack_codes, unpack_3bit, unpack_4bit)

__all__ = [
    "BITS", "DOUBLE_QUANT_BLOCK", "FORMATS", "NF4_CODEBOOK", "NF4_DEFAULT_GROUP", "QuantizationError",
    "QuantizedMatrix", "as_matrix", "concatenate_outputs", "dequantize", "dequantize_matrix", "double_quantize",
    "group_parameters", "int_quant_params", "nf4_absmax", "pack_3bit", "pack_4bit", "pack_codes",
    "quantize", "quantize_with", "quantized_matmul", "resolve_group_size", "unpack_3bit", "unpack_4bit",
    "unpacked_codes",
]

NF4_DEFAULT_GROUP = 64  # QLoRA's block size
DOUBLE_QUANT_BLOCK = 256  # QLoRA's block size for quantizing the scales


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
    grouped = group_rows(matrix, group_size)
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


def concatenate_outputs(matrices: list[QuantizedMatrix]) -> QuantizedMatrix:
    """Matrices sharing input, format and group size, side by side along the output axis (e.g. q|k|v
    fused for decoding). Exact for int formats (every output column is quantized on its own); nf4's int8
    scale constants are re-blocked, which moves a scale by well under 1% (far below NF4's own error). 2-D result."""
    first = matrices[0]
    stored = lambda m: tuple(getattr(m, name) is not None for name in ("zeros", "offsets"))  # noqa: E731
    if any(m.format != first.format or m.group_size != first.group_size or m.in_features != first.in_features
           or m.lead_shape != first.lead_shape for m in matrices):
        raise QuantizationError("only matrices of one format, group size and input dimension concatenate")
    if any(stored(m) != stored(first) for m in matrices):
        raise QuantizationError("only matrices that all store zero points, all store offsets or all store neither "
                                "concatenate (mixed: dequantize, or re-quantize one way)")
    if first.scale_codes is not None:  # double-quantization constants are per matrix: re-block them
        absmax = jnp.concatenate([nf4_absmax(m) for m in matrices], axis=-1)
        parts = double_quantize(absmax)
    else:
        cat = lambda name: (None if getattr(first, name) is None  # noqa: E731
                            else jnp.concatenate([getattr(m, name) for m in matrices], axis=-1))
        parts = dict(scales=cat("scales"), zeros=cat("zeros"), offsets=cat("offsets"))
    codes = jnp.concatenate([m.codes for m in matrices], axis=-1)
    out = sum(m.out_features for m in matrices)
    return QuantizedMatrix(codes, **parts, format=first.format, group_size=first.group_size,
                           shape=(first.in_features, out), in_dims=1)
