"""Grouped matrix multiply for Mixture-of-Experts in Pallas (Triton lowering), forward and backward.

    out = grouped_matmul(lhs, rhs, group_sizes)      # lhs [M, K], rhs [G, K, N], group_sizes [G] -> [M, N]

Rows of `lhs` come in contiguous groups: the first group_sizes[0] rows are multiplied by rhs[0], the
next group_sizes[1] by rhs[1], and so on (rows past sum(group_sizes) give zeros), exactly
`jax.lax.ragged_dot`, the reference.

How: each group's rows are laid out padded to a multiple of `block_m` (the "aligned" layout of
vLLM's fused MoE), so every row tile belongs to one group and the kernel is a plain tiled matmul
whose right-hand tile comes from that tile's group: one program per output tile (in bands of
`group_m` row tiles, for L2 reuse), K walked in `block_k` steps with a float32 accumulator. The layout costs at most G - 1 partial tiles.
MoE code that builds the padded layout itself (llmjax.model.moe) calls `grouped_matmul_padded`
and skips the copies in and out of it.

Backward: d_lhs is the same kernel against rhs transposed (read transposed in the kernel, no
copy); d_rhs[g] = lhs_g^T @ d_out_g is a second kernel with grid (G, K tiles, N tiles), each
program summing over its group's row tiles. Both run in interpret mode on CPUs for tests.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .platform import compute_platform
from .tiles import combine_masks

__all__ = ["GroupLayout", "grouped_matmul", "grouped_matmul_padded", "grouped_matmul_reference", "group_layout"]

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The reference: jax.lax.ragged_dot (float32 accumulation, output in lhs.dtype)."""
    return lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Static launch shape (hashable: a custom_vjp non-differentiable argument)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    interpret: bool = False
    group_m: int = 8  # row tiles per band: programs walk a band's column tiles together (L2 reuse of lhs)


def default_tiles(k: int, n: int, block_m: int | None = None, interpret: bool | None = None) -> TileConfig:
    """Tiles for a [*, k] x [k, n] product: 128 x 128 x 64 on GPUs, smaller for small matrices."""
    interpret = compute_platform() != "gpu" if interpret is None else interpret
    block_m = block_m or (16 if interpret else 128)
    block_n = max(16, min(128, pl.next_power_of_2(n)))
    block_k = max(16, min(64, pl.next_power_of_2(k)))
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return TileConfig(block_m, block_n, block_k, warps, 3, interpret)


# --- the padded layout -------------------------------------------------------------------

class GroupLayout(NamedTuple):
    """Where each group's rows sit in the padded layout (all int32; built by `group_layout`).

    padded rows = row tiles * block_m, a static bound: ceil((M + G * (block_m - 1)) / block_m) tiles.
    """

    tile_group: jax.Array  # [row tiles] the group of each tile; -1 for tiles past the last group
    group_first_tile: jax.Array  # [G]
    group_tiles: jax.Array  # [G] tiles of each group (0 for an empty group)
    padded_to_row: jax.Array  # [padded rows] source row of each padded row; M (out of range) for padding
    row_to_padded: jax.Array  # [M] padded row of each row; padded rows (out of range) past the last group


def num_row_tiles(rows: int, groups: int, block_m: int) -> int:
    return pl.cdiv(rows + groups * (block_m - 1), block_m)


def group_layout(group_sizes: jax.Array, rows: int, block_m: int) -> GroupLayout:
    """The padded layout of `rows` rows in groups of group_sizes [G] (each group padded to block_m)."""
    groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    tiles = (sizes + block_m - 1) // block_m  # [G]
    tile_end = jnp.cumsum(tiles)
    first_tile = tile_end - tiles
    row_end = jnp.cumsum(sizes)
    first_row = row_end - sizes
    row_tiles = num_row_tiles(rows, groups, block_m)
    tile_group = jnp.searchsorted(tile_end, jnp.arange(row_tiles, dtype=jnp.int32), side="right").astype(jnp.int32)
    tile_group = jnp.where(tile_group < groups, tile_group, -1)

    padded = jnp.arange(row_tiles * block_m, dtype=jnp.int32)
    group_of_padded = jnp.maximum(tile_group[padded // block_m], 0)
    offset = padded - first_tile[group_of_padded] * block_m
    real = (tile_group[padded // block_m] >= 0) & (offset < sizes[group_of_padded])
    padded_to_row = jnp.where(real, first_row[group_of_padded] + offset, rows)

    row = jnp.arange(rows, dtype=jnp.int32)
    group_of_row = jnp.searchsorted(row_end, row, side="right").astype(jnp.int32)
    in_group = group_of_row < groups
    group_of_row = jnp.minimum(group_of_row, groups - 1)
    row_to_padded = jnp.where(in_group, first_tile[group_of_row] * block_m + row - first_row[group_of_row],
                              row_tiles * block_m)
    return GroupLayout(tile_group, first_tile.astype(jnp.int32), tiles.astype(jnp.int32), padded_to_row, row_to_padded)


def to_padded(x: jax.Array, layout: GroupLayout) -> jax.Array:
    """[M, ...] rows -> [padded rows, ...] (zeros in the padding)."""
    return jnp.take(x, layout.padded_to_row, axis=0, mode="fill", fill_value=0)


def from_padded(x: jax.Array, layout: GroupLayout) -> jax.Array:
    """[padded rows, ...] -> [M, ...] (zeros for rows past the last group)."""
    return jnp.take(x, layout.row_to_padded, axis=0, mode="fill", fill_value=0)


# --- kernels -----------------------------------------------------------------------------

def _swizzled_tile(program, row_tiles: int, column_tiles: int, group_m: int):
    """(row tile, column tile) of a 1-D program id, in bands of group_m row tiles: consecutive programs
    share lhs rows and rhs columns, so both stay in L2 (Triton's grouped ordering)."""
    per_band = group_m * column_tiles
    band = program // per_band
    first = band * group_m
    band_rows = jnp.minimum(row_tiles - first, group_m)
    within = program % per_band
    return first + within % band_rows, within // band_rows


def _matmul_kernel(tile_group_ref, lhs_ref, rhs_ref, out_ref, *, tiles: TileConfig, k: int, n: int, transpose_rhs: bool,
                   row_tiles: int):
    """One [block_m, block_n] output tile: lhs rows of one group times that group's rhs (or rhs^T)."""
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    tile, column_tile = _swizzled_tile(pl.program_id(0), row_tiles, pl.cdiv(n, bn), tiles.group_m)
    group = tile_group_ref[tile]
    first_row, first_col = tile * bm, column_tile * bn
    col_mask = None if n % bn == 0 else first_col + jnp.arange(bn) < n

    def k_step(step, acc):
        first_k = step * bk
        k_mask = None if k % bk == 0 else first_k + jnp.arange(bk) < k
        a_mask = combine_masks(None, k_mask)
        a = plgpu.load(lhs_ref.at[pl.ds(first_row, bm), pl.ds(first_k, bk)], mask=a_mask,
                       other=None if a_mask is None else 0.0)
        if transpose_rhs:  # rhs [G, n, k]: read a [bn, bk] tile and transpose it in registers
            b_mask = combine_masks(col_mask, k_mask)
            b = plgpu.load(rhs_ref.at[group, pl.ds(first_col, bn), pl.ds(first_k, bk)], mask=b_mask,
                           other=None if b_mask is None else 0.0).T
        else:  # rhs [G, k, n]
            b_mask = combine_masks(k_mask, col_mask)
            b = plgpu.load(rhs_ref.at[group, pl.ds(first_k, bk), pl.ds(first_col, bn)], mask=b_mask,
                           other=None if b_mask is None else 0.0)
        return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

    out_block = out_ref.at[pl.ds(first_row, bm), pl.ds(first_col, bn)]
    out_mask = combine_masks(None, col_mask)

    @pl.when(group >= 0)
    def _():
        acc = lax.fori_loop(0, pl.cdiv(k, bk), k_step, jnp.zeros((bm, bn), jnp.float32))
        plgpu.store(out_block, acc.astype(out_ref.dtype), mask=out_mask)

    @pl.when(group < 0)  # a tile past the last group: zeros, so nothing downstream reads garbage
    def _():
        plgpu.store(out_block, jnp.zeros((bm, bn), out_ref.dtype), mask=out_mask)


def _padded_matmul(lhs, rhs, tile_group, tiles: TileConfig, transpose_rhs: bool):
    """lhs [padded rows, k] x per-tile rhs -> [padded rows, n]."""
    padded_rows, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    row_tiles = padded_rows // tiles.block_m
    kernel = functools.partial(_matmul_kernel, tiles=tiles, k=k, n=n, transpose_rhs=transpose_rhs, row_tiles=row_tiles)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, n), lhs.dtype),
        grid=(row_tiles * pl.cdiv(n, tiles.block_n),),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=tiles.interpret,
        name="grouped_matmul_transposed" if transpose_rhs else "grouped_matmul",
    )(tile_group, lhs, rhs)


def _rhs_gradient_kernel(first_tile_ref, group_tiles_ref, lhs_ref, d_out_ref, d_rhs_ref, *, tiles: TileConfig,
                         k: int, n: int, k_block: int):
    """d_rhs[g] tile [k_block, block_n] = sum over group g's row tiles of lhs_tile^T @ d_out_tile."""
    bm, bn = tiles.block_m, tiles.block_n
    group, k_tile, column_tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first_k, first_col = k_tile * k_block, column_tile * bn
    k_mask = None if k % k_block == 0 else first_k + jnp.arange(k_block) < k
    col_mask = None if n % bn == 0 else first_col + jnp.arange(bn) < n
    first = first_tile_ref[group]

    def row_tile(t, acc):
        first_row = (first + t) * bm
        a_mask = combine_masks(None, k_mask)
        a = plgpu.load(lhs_ref.at[pl.ds(first_row, bm), pl.ds(first_k, k_block)], mask=a_mask,
                       other=None if a_mask is None else 0.0)
        b_mask = combine_masks(None, col_mask)
        b = plgpu.load(d_out_ref.at[pl.ds(first_row, bm), pl.ds(first_col, bn)], mask=b_mask,
                       other=None if b_mask is None else 0.0)
        return acc + jnp.dot(a.T, b, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, group_tiles_ref[group], row_tile, jnp.zeros((k_block, bn), jnp.float32))
    plgpu.store(d_rhs_ref.at[group, pl.ds(first_k, k_block), pl.ds(first_col, bn)], acc.astype(d_rhs_ref.dtype),
                mask=combine_masks(k_mask, col_mask))


def _rhs_gradient(lhs, d_out, layout: GroupLayout, groups: int, tiles: TileConfig, rhs_dtype):
    """[G, k, n]: every group's lhs^T @ d_out over its padded rows."""
    k, n = lhs.shape[1], d_out.shape[1]
    k_block = max(16, min(128, pl.next_power_of_2(k)))
    kernel = functools.partial(_rhs_gradient_kernel, tiles=tiles, k=k, n=n, k_block=k_block)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, k, n), rhs_dtype),
        grid=(groups, pl.cdiv(k, k_block), pl.cdiv(n, tiles.block_n)),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=tiles.interpret,
        name="grouped_matmul_rhs_gradient",
    )(layout.group_first_tile, layout.group_tiles, lhs, d_out)


# --- differentiable entry points ---------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul_padded(lhs, rhs, layout: GroupLayout, tiles: TileConfig):
    return _padded_matmul(lhs, rhs, layout.tile_group, tiles, transpose_rhs=False)


def _forward(lhs, rhs, layout, tiles):
    return _padded_matmul(lhs, rhs, layout.tile_group, tiles, transpose_rhs=False), (lhs, rhs, layout)


def _backward(tiles, residuals, d_out):
    lhs, rhs, layout = residuals
    d_tiles = dataclasses.replace(tiles, block_n=max(16, min(128, pl.next_power_of_2(rhs.shape[1]))),
                                  block_k=max(16, min(64, pl.next_power_of_2(rhs.shape[2]))))
    d_lhs = _padded_matmul(d_out, rhs, layout.tile_group, d_tiles, transpose_rhs=True)
    d_rhs = _rhs_gradient(lhs, d_out, layout, rhs.shape[0], tiles, rhs.dtype)
    no_gradient = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), layout)
    return d_lhs, d_rhs, no_gradient


_grouped_matmul_padded.defvjp(_forward, _backward)


def _check(lhs, rhs, group_sizes=None) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul takes lhs [M, K] and rhs [G, K, N]; got {lhs.shape} and {rhs.shape}")
    if group_sizes is not None and group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must have shape ({rhs.shape[0]},), one per group of rhs; got {group_sizes.shape}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if jnp.dtype(x.dtype) not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
            raise TypeError(f"grouped_matmul takes float32, bfloat16 or float16; {name} is {jnp.dtype(x.dtype).name}")
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"lhs ({lhs.dtype}) and rhs ({rhs.dtype}) must have the same dtype")


def grouped_matmul_padded(lhs_padded: jax.Array, rhs: jax.Array, layout: GroupLayout, tiles: TileConfig) -> jax.Array:
    """lhs_padded [padded rows, K] (layout from `group_layout` with tiles.block_m) x rhs [G, K, N] -> [padded rows, N].

    Padding rows of the output are zero only if those of lhs_padded are; they must not be read.
    """
    _check(lhs_padded, rhs)
    return _grouped_matmul_padded(lhs_padded, rhs, layout, tiles)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiles: TileConfig | None = None,
                   interpret: bool | None = None) -> jax.Array:
    """lhs [M, K] rows in groups of group_sizes [G] times rhs [G, K, N] -> [M, N], like jax.lax.ragged_dot.

    interpret: run the Pallas kernels in interpret mode (default: when no GPU is present).
    """
    _check(lhs, rhs, group_sizes)
    tiles = tiles or default_tiles(lhs.shape[1], rhs.shape[2], interpret=interpret)
    layout = group_layout(group_sizes, lhs.shape[0], tiles.block_m)
    return from_padded(_grouped_matmul_padded(to_padded(lhs, layout), rhs, layout, tiles), layout)
