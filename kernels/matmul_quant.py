"""Fused dequantize-matmul in Pallas (Triton lowering): x [M, K] @ a weight-only quantized [K, N] matrix.

    y = quantized_matmul_pallas(x, qm)     # qm: llmjax.quant.formats.QuantizedMatrix (int8, int4, int3, nf4)

The weights stay quantized in memory: each program loads a [block_k, block_n] tile of codes (for 4-bit
formats a [block_k / 2, block_n] tile of bytes), its group's scales (and zero points), dequantizes in
registers and accumulates x_tile @ w_tile in float32. Decode moves a quarter (int4) or half (int8) of the
bf16 weight bytes, which is the whole cost of a batch-1 matmul.

4-bit codes hold input rows 2i (low nibble) and 2i+1 (high nibble) in one byte. Rather than interleaving
the two nibble planes back into a [block_k, block_n] tile, the input is split into its even and odd
columns once (outside, [M, K / 2] each, cheap for decode and prefill shapes alike), and a step adds
x_even @ low + x_odd @ high: two dots, no shuffles. int3 the same way with eight planes: eight codes
live in a 24-bit word spread over three byte planes (llmjax.quant.formats.pack_3bit); the input is split
by column mod 8 ([8, M, K / 8]) and a step adds eight dots (block_k / 8 rows each).

Shapes: one program per [block_m, block_n] output tile; M is padded to block_m (16 for decode-shaped
inputs: Triton's smallest dot), N is masked, K is walked in steps of block_k inside one scale group
(block_k divides the group size). NF4 scales are decoded from their double quantization outside
(groups x N values, small) and the 16-level codebook is a select chain in registers.

The reference is `llmjax.quant.formats.quantized_matmul` (XLA: dequantize, then one dot). Interpret-mode
tests run the kernel on CPUs; `tests/kernels/test_matmul_quant.py` also has a GPU test.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.tiles import combine_masks
from llmjax.quant.formats import NF4_CODEBOOK, QuantizedMatrix, group_scales_and_zeros, quantized_matmul

__all__ = ["MatmulTiles", "default_tiles", "quantized_matmul_pallas", "quantized_matmul_reference"]

quantized_matmul_reference = quantized_matmul


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    interpret: bool = False


def default_tiles(m: int, k: int, n: int, group_size: int, interpret: bool | None = None) -> MatmulTiles:
    """Decode shapes (M <= 16): 16 x 128 tiles, split-free; prefill shapes: 64 x 128. block_k is the largest
    of 128 / 64 / 32 that divides the group size (else the group size itself)."""
    interpret = jax.devices()[0].platform != "gpu" if interpret is None else interpret
    block_m = 16 if m <= 16 else 64
    block_k = next((b for b in (128, 64, 32) if group_size % b == 0), group_size)
    block_n = 128 if n >= 128 else max(16, pl.next_power_of_2(n))
    warps = 4 if block_m == 16 else 8
    return MatmulTiles(block_m, block_n, block_k, warps, 3 if block_m == 16 else 2, interpret)


def _dequantize_tile(codes, scale, zero, fmt: str, dtype):
    """uint8 codes [rows, block_n] -> weights [rows, block_n] in dtype."""
    if fmt == "nf4":
        values = jnp.zeros(codes.shape, jnp.float32)
        for index, level in enumerate(NF4_CODEBOOK.tolist()):
            values = jnp.where(codes == index, level, values)
        return (values * scale[None, :]).astype(dtype)
    return ((codes.astype(jnp.float32) - zero[None, :]) * scale[None, :]).astype(dtype)


def _kernel(*refs, fmt: str, packed: bool, n: int, k: int, group_size: int, tiles: MatmulTiles):
    if fmt == "int3":
        return _kernel_3bit(*refs, n=n, k=k, group_size=group_size, tiles=tiles)
    if packed:
        x_even_ref, x_odd_ref, codes_ref, scale_ref, zero_ref, out_ref = refs
    else:
        x_ref, codes_ref, scale_ref, zero_ref, out_ref = refs
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    first_row, first_col = pl.program_id(0) * bm, pl.program_id(1) * bn
    col_mask = None if n % bn == 0 else first_col + jnp.arange(bn) < n
    tile_mask = combine_masks(None, col_mask)
    fill = None if col_mask is None else 0
    code_rows = bk // 2 if packed else bk  # code rows per step

    def step(index, acc):
        group = (index * bk) // group_size
        scale = plgpu.load(scale_ref.at[group, pl.ds(first_col, bn)], mask=col_mask, other=fill)  # [bn]
        zero = plgpu.load(zero_ref.at[group, pl.ds(first_col, bn)], mask=col_mask, other=fill)
        codes = plgpu.load(codes_ref.at[pl.ds(index * code_rows, code_rows), pl.ds(first_col, bn)], mask=tile_mask,
                           other=fill)
        if packed:
            x_even = x_even_ref[pl.ds(first_row, bm), pl.ds(index * code_rows, code_rows)]
            x_odd = x_odd_ref[pl.ds(first_row, bm), pl.ds(index * code_rows, code_rows)]
            low = _dequantize_tile(codes & 0xF, scale, zero, fmt, x_even.dtype)
            high = _dequantize_tile(codes >> 4, scale, zero, fmt, x_even.dtype)
            acc = acc + jnp.dot(x_even, low, preferred_element_type=jnp.float32)
            return acc + jnp.dot(x_odd, high, preferred_element_type=jnp.float32)
        x = x_ref[pl.ds(first_row, bm), pl.ds(index * bk, bk)]
        return acc + jnp.dot(x, _dequantize_tile(codes, scale, zero, fmt, x.dtype), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k // bk, step, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(out_ref.at[pl.ds(first_row, bm), pl.ds(first_col, bn)], acc.astype(out_ref.dtype), mask=tile_mask)


def _kernel_3bit(x8_ref, codes_ref, scale_ref, zero_ref, out_ref, *, n: int, k: int, group_size: int,
                 tiles: MatmulTiles):
    """int3: codes_ref holds three byte planes of k / 8 rows each; x8_ref [8, rows, k / 8] (column mod 8)."""
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    first_row, first_col = pl.program_id(0) * bm, pl.program_id(1) * bn
    col_mask = None if n % bn == 0 else first_col + jnp.arange(bn) < n
    tile_mask = combine_masks(None, col_mask)
    fill = None if col_mask is None else 0
    words, plane_rows = bk // 8, k // 8

    def step(index, acc):
        group = (index * bk) // group_size
        scale = plgpu.load(scale_ref.at[group, pl.ds(first_col, bn)], mask=col_mask, other=fill)
        zero = plgpu.load(zero_ref.at[group, pl.ds(first_col, bn)], mask=col_mask, other=fill)
        word = jnp.zeros((words, bn), jnp.uint32)
        for plane in range(3):
            byte = plgpu.load(codes_ref.at[pl.ds(plane * plane_rows + index * words, words), pl.ds(first_col, bn)],
                              mask=tile_mask, other=fill)
            word = word | (byte.astype(jnp.uint32) << (8 * plane))
        for i in range(8):
            x = x8_ref[i, pl.ds(first_row, bm), pl.ds(index * words, words)]
            w = _dequantize_tile((word >> (3 * i)) & 7, scale, zero, "int3", x.dtype)
            acc = acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
        return acc

    acc = lax.fori_loop(0, k // bk, step, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(out_ref.at[pl.ds(first_row, bm), pl.ds(first_col, bn)], acc.astype(out_ref.dtype), mask=tile_mask)


@functools.partial(jax.jit, static_argnames=("tiles",))
def _call(x2d, qm: QuantizedMatrix, tiles: MatmulTiles):
    m, k = x2d.shape
    n = qm.out_features
    rows = pl.cdiv(m, tiles.block_m) * tiles.block_m
    x2d = jnp.pad(x2d, ((0, rows - m), (0, 0)))
    scale, zero = group_scales_and_zeros(qm)  # [groups, n] float32 (nf4: decoded absmax, no zero point)
    zero = jnp.zeros_like(scale) if zero is None else zero
    packed = qm.bits == 4
    if qm.bits == 3:
        inputs = (x2d.reshape(rows, k // 8, 8).transpose(2, 0, 1),)  # [8, rows, k / 8]: column mod 8
    else:
        inputs = (x2d[:, 0::2], x2d[:, 1::2]) if packed else (x2d,)
    kernel = functools.partial(_kernel, fmt=qm.format, packed=packed, n=n, k=k, group_size=qm.group_size, tiles=tiles)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, n), x2d.dtype),
        grid=(rows // tiles.block_m, pl.cdiv(n, tiles.block_n)),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=tiles.interpret,
        name=f"matmul_{qm.format}",
    )(*inputs, qm.codes, scale, zero)
    return out[:m]


def quantized_matmul_pallas(x: jax.Array, qm: QuantizedMatrix, *, tiles: MatmulTiles | None = None,
                            interpret: bool | None = None) -> jax.Array:
    """x [..., K] @ qm ([K, N], one matrix) -> [..., N] in x's dtype, float32 accumulation.
    interpret: run in Pallas interpret mode (default: when no GPU is present)."""
    if qm.lead_shape:
        raise ValueError(f"quantized_matmul_pallas takes one matrix; this one has leading axes {qm.lead_shape}")
    k = qm.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the quantized matrix expects {k}")
    x2d = x.reshape(-1, k)
    tiles = tiles or default_tiles(x2d.shape[0], k, qm.out_features, qm.group_size, interpret)
    if qm.group_size % tiles.block_k or tiles.block_k % {4: 2, 3: 8}.get(qm.bits, 1):
        raise ValueError(f"block_k={tiles.block_k} must divide the group size {qm.group_size} (and be even for 4-bit, "
                         f"a multiple of 8 for int3)")
    return _call(x2d, qm, tiles).reshape(*x.shape[:-1], qm.out_features)
