"""Fused dequantize-matmul in Pallas (Triton lowering): x [M, K] @ a weight-only quantized [K, N] matrix.

    y = quantized_matmul_pallas(x, qm)     # qm: QuantizedMatrix (int8, int4, int3, nf4), defined below

The weights stay quantized in memory: a program loads a tile of codes (for 4-bit formats a [block_k / 2,
block_n] tile of bytes), its group's scales and zero points or offsets as stored (float16 / uint8 / float16;
NF4's double-quantized int8 scale codes, their per-block float32 scales and the mean), dequantizes in registers
and accumulates in float32. Nothing is prepared outside the kernel, so one call is one kernel (plus the split-K
sum below). Every kernel takes offsets (QuantizedMatrix.offsets, w = code * scale + offset) natively.

Three kernels, picked by `MatmulTiles` (`default_tiles` chooses):

- swap_ab (decode, 1-16 rows; int4 / int8 / NF4): the tensor cores with the dequantized weights as the first
  operand, out^T [block_n, 16] = W^T [block_n, block_k] @ x^T [block_k, 16], so the weight columns fill the
  MMA's 64-row side and x's few rows pad its 16-column side (Marlin's and Machete's layout). Codes are decoded
  by inline PTX, four per register (`nibble_asm`): a byte permute and one LOP3 turn two nibbles into a bf16 pair
  128 + c (OR-ed into the mantissa of 128.0), and NF4 levels come from a 16-entry table held in the immediates
  of byte permutes; int8 is two nibble planes (c = low + 16 high). The zero point and the scale are applied to
  each step's [block_n, 16] product, not to every weight: sum_k s (c_k - z) x_k = s (sum_k (c_k + 128) x_k -
  (z + 128) sum_k x_k), and an additive offset m (GGUF's Q4_1 min) likewise: sum_k (s c_k + m) x_k =
  s sum_k c_k x_k + m sum_k x_k. Triton moves the raw codes, not the bf16 weights, into the MMA's register layout.
- block_m == 1, the GEMV (int8 and NF4 at one row, where it measured faster): one program per (input row,
  block_n columns, K split), no tensor cores. A step multiplies a [block_k] slice of x into a [block_k, block_n]
  dequantized tile elementwise and adds it to a 2-D float32 accumulator, summed over its rows once at the end.
  4-bit codes hold input rows 2i (low nibble) and 2i+1 (high nibble) in one byte, so the step reads x's even and
  odd columns and adds x_even * low + x_odd * high.
- block_m >= 16, tensor-core tiles with the weights as the second operand (prefill, int3): one program per
  ([block_m, block_n] output tile, K split), x_even @ low + x_odd @ high per step (two dots); int3 the same with
  eight planes (eight codes in a 24-bit word over three byte planes, kernels.quant_formats.pack_3bit; x read by
  column mod 8).

Split-K: a decode matmul has only N / block_n column tiles (32 for N = 4096 and 128-column tiles), far fewer
than a GPU's streaming multiprocessors, and each must stream K / 2 rows of bytes. `splits` cuts K into that many
ranges, each its own program writing float32 partial sums [splits, M, N]; one small XLA sum adds them (and fuses
into whatever consumes the product). `default_tiles` picks splits to give about four programs per
multiprocessor. (Adding the partial sums in the kernel instead, by the last program of each tile to arrive at
an atomic counter, measured slower: docs/perf.md, "Quantization and LoRA".) In the GEMV and the second-operand
kernel, NF4's 16 levels are read from a 16-entry table in global memory (an L1-resident gather), or with
`nf4_lookup="select"` a chain of selects, and integer codes become floats without an int -> float conversion:
OR-ed into the mantissa of 2^23, a code c reads as the float 2^23 + c exactly, and 2^23 + zero point is
subtracted (`int_decode="convert"` converts instead, kept for the comparison).

`QuantizedMatrix` (the pytree the kernel reads; the storage layout is kernels/quant_formats.py) and the reference,
`quantized_matmul` (XLA: dequantize, then one dot), are at the bottom of this file; llmjax.quant.formats quantizes
weights into them. Below them, `quantized_matvec`: the few-row product in plain XLA for CPUs (decoding), which
reads the codes in one fused loop instead of writing the float matrix (matmul="matvec", or "auto" on a CPU); for
symmetric int8 on CPUs, kernels/cpu_qmatvec.py's custom call (matmul="cpu", a matrix packed once with its codes
transposed: `QuantizedMatrix.cpu_packed`; every function here reads that layout too). Interpret-mode
tests run the kernels on CPUs (the PTX decode through a small PTX interpreter in the test);
`tests/kernels/test_matmul_quant.py` also has GPU tests at real sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .platform import compute_device, compute_platform
from .quant_formats import (
    BITS,
    MATMULS,
    NF4_CODEBOOK,
    QuantizationError,
    group_rows,
    unpack_codes,
)
from . import cpu_qmatvec
from .tiles import combine_masks

__all__ = ["MatmulTiles", "QuantizedMatrix", "default_tiles", "dequantize", "dequantize_matrix",
           "group_parameters", "nf4_absmax", "quantized_matmul", "quantized_matmul_pallas",
           "quantized_matmul_reference", "quantized_matvec", "resolve_quantized_matmul", "unpacked_codes"]

PROGRAMS_PER_SM = 4  # split-K target: about this many programs per streaming multiprocessor


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
    block_m: int = 16  # 1: the GEMV kernel (one input row per program); else tensor-core tiles (>= 16)
    block_n: int = 128
    block_k: int = 128  # input rows per step; divides the group size
    splits: int = 1  # programs along K (partial sums added outside); divides K / block_k
    num_warps: int = 4
    num_stages: int = 3
    nf4_lookup: str = "gather"  # "gather" (16-entry table in memory), "select" (a select chain) or "permute" (swap_ab:
    # byte permutes of a table in registers, `nibble_asm`)
    int_decode: str = "magic"  # int codes to float: "magic" (exponent bits, no conversion) or "convert"
    interpret: bool = False
    swap_ab: bool = False  # tensor cores with the weights as the first operand: out^T [bn, bm] = W^T [bn, bk] @ x^T


def _multiprocessors() -> int:
    return int(getattr(compute_device(), "core_count", 0) or 132)


def choose_splits(k_steps: int, programs: int, target: int) -> int:
    """About target / programs splits of the k_steps steps (1 .. k_steps), each split with at least one step;
    the last split may have fewer steps than the others."""
    splits = min(k_steps, max(1, target // max(programs, 1)))
    return pl.cdiv(k_steps, pl.cdiv(k_steps, splits))


def split_steps(k_steps: int, splits: int) -> int:
    """Steps per split (the last one takes what is left)."""
    return pl.cdiv(k_steps, splits)


def default_tiles(m: int, k: int, n: int, group_size: int, interpret: bool | None = None, fmt: str = "int4",
                  ) -> MatmulTiles:
    """Decode (M <= 16, not int3): the swap_ab kernel, 128 weight columns x 128 input rows a step (64 for int8 and
    NF4), x's rows padded to 16, 4 warps, no software pipelining (the loads feed the decode in registers), NF4 by
    byte permutes; except int8 and NF4 at one row, where the GEMV (128 columns x 64 rows, 2 warps) measured
    faster (docs/perf.md, "Quantization and LoRA"). Else tensor-core tiles of 64 x 128. K is split to give about
    PROGRAMS_PER_SM programs per multiprocessor (prefill grids only when they have fewer programs than
    multiprocessors). block_k is the largest allowed size that divides the group size."""
    interpret = compute_platform() != "gpu" if interpret is None else interpret
    gemv = m == 1 and fmt in ("int8", "nf4")
    swap_ab = m <= 16 and fmt != "int3" and not gemv
    block_m = 1 if gemv else 16 if m <= 16 else 64
    sizes = (128, 64, 32) if not (swap_ab or gemv) or fmt == "int4" else (64, 32)
    block_k = next((b for b in sizes if group_size % b == 0), group_size)
    block_n = 128 if n >= 128 else max(16, pl.next_power_of_2(n))
    programs, multiprocessors = pl.cdiv(m, block_m) * pl.cdiv(n, block_n), _multiprocessors()
    # prefill-sized grids fill the GPU already: split only when there are fewer programs than multiprocessors
    splits = choose_splits(k // block_k, programs, PROGRAMS_PER_SM * multiprocessors) if m <= 16 or programs < \
        multiprocessors else 1
    warps = 2 if gemv else 4 if block_m == 16 else 8
    stages = 1 if gemv or swap_ab else 3 if block_m == 16 else 2
    return MatmulTiles(block_m, block_n, block_k, splits, warps, stages, "permute" if swap_ab else "gather",
                       interpret=interpret, swap_ab=swap_ab)


MAGIC_BITS = 0x4B000000  # float32 2^23: OR-ing a code c < 2^23 into its mantissa gives exactly 2^23 + c
MAGIC = float(2**23)
BF16_MAGIC_BITS = 0x4300  # bfloat16 128.0: OR-ing a code c < 128 into its 7 mantissa bits gives exactly 128 + c
BF16_MAGIC = 128.0


def _bf16_bits(values) -> list[int]:
    """float values -> their bfloat16 bit patterns (round to nearest even, as .astype(bfloat16)); numpy only, so
    it runs inside a kernel's trace."""
    return [int(v) for v in np.asarray(values, np.float32).astype(jnp.bfloat16).view(np.uint16)]


def nibble_asm(nibble: str, levels: list[int] | None = None) -> str:
    """PTX for Triton's elementwise inline assembly with pack=4: four uint8 codes (one register, $2) -> four bf16 made
    from one nibble of each code (nibble "low" or "high"), two to a register ($0: codes 0, 1; $1: codes 2, 3).
    levels None: 128 + nibble (OR-ed into the mantissa of bf16 128.0): two byte permutes put codes i and i + 1 in the
    16-bit halves of a register, one LOP3 masks and ORs both (the high nibbles shifted down first), an instruction per
    weight where Triton's own code extracts, converts and repacks each element. levels: 16 bf16 bit patterns,
    levels[nibble] looked up by byte permutes (PRMT picks bytes 0-7 of a register pair by 3-bit index: the low and
    the high bytes of entries 0-7 and 8-15, then bit 3 of each code selects between them)."""
    if nibble not in ("low", "high"):
        raise ValueError(f"nibble={nibble!r}: expected 'low' or 'high'")
    if levels is None:
        shift = "" if nibble == "low" else "shr.u32 pair01, pair01, 4;\nshr.u32 pair23, pair23, 4;\n"
        return ("{\n.reg .b32 pair01, pair23;\nprmt.b32 pair01, $2, 0, 0x4140;\nprmt.b32 pair23, $2, 0, 0x4342;\n"
                + shift + "lop3.b32 $0, pair01, 0x000F000F, 0x43004300, 0xEA;\n"
                "lop3.b32 $1, pair23, 0x000F000F, 0x43004300, 0xEA;\n}")

    def table(part: int) -> list[str]:  # the low (0) or high (1) bytes of the 16 entries, four to a word
        data = [(level >> (8 * part)) & 0xFF for level in levels]
        return [hex(sum(data[4 * w + i] << (8 * i) for i in range(4))) for w in range(4)]

    low_bytes, high_bytes = table(0), table(1)
    nibbles = "and.b32 c, $2, 0x0F0F0F0F;" if nibble == "low" else "shr.u32 c, $2, 4;\nand.b32 c, c, 0x0F0F0F0F;"
    return "\n".join([
        "{", ".reg .b32 c, s, t, u, sel, v, m, a, lo, hi;", nibbles,
        # sel: the codes' low 3 bits as four selector nibbles: code i's byte index into an 8-byte table half
        "shr.u32 s, c, 4;", "and.b32 t, c, 0x00070007;", "lop3.b32 t, s, 0x00700070, t, 0xEA;", "shr.u32 u, t, 8;",
        "or.b32 sel, t, u;",
        # m: 0xFF in the bytes of codes >= 8 (PRMT's sign-replicate mode on bit 3 shifted into each byte's top bit)
        "shl.b32 v, c, 4;", "prmt.b32 m, v, 0, 0xBA98;",
        f"prmt.b32 lo, {low_bytes[0]}, {low_bytes[1]}, sel;", f"prmt.b32 a, {low_bytes[2]}, {low_bytes[3]}, sel;",
        "lop3.b32 lo, a, m, lo, 0xE2;",
        f"prmt.b32 hi, {high_bytes[0]}, {high_bytes[1]}, sel;", f"prmt.b32 a, {high_bytes[2]}, {high_bytes[3]}, sel;",
        "lop3.b32 hi, a, m, hi, 0xE2;",
        "prmt.b32 $0, lo, hi, 0x5140;", "prmt.b32 $1, lo, hi, 0x7362;", "}"])


def _codes_to_float(codes, int_decode: str):
    """uint32 codes -> float32 codes. "magic" puts the code in the mantissa of 2^23 (the caller's offset subtracts
    2^23: integer ops only, no int -> float conversion); "convert" converts (and the offset leaves out 2^23)."""
    if int_decode == "magic":
        return lax.bitcast_convert_type(codes | MAGIC_BITS, jnp.float32)
    return codes.astype(jnp.float32)


def _nf4_levels(codes, codebook_ref, lookup: str):
    """uint32 codes < 16 -> float32 NF4 levels (a gather from the table, or a select chain: "select", and "permute"
    where the PTX table lookup cannot run)."""
    if lookup == "gather":
        return plgpu.load(codebook_ref.at[codes.astype(jnp.int32)])
    values = jnp.zeros(codes.shape, jnp.float32)
    for index, level in enumerate(NF4_CODEBOOK.tolist()):
        values = jnp.where(codes == index, level, values)
    return values


def _nibble_values(codes, nibble: str, dtype, inline_asm: bool, levels=None, codebook_ref=None, lookup="gather"):
    """uint8 codes -> one nibble of each as bf16: 128 + nibble, or with levels / an NF4 lookup the level."""
    if inline_asm:
        return plgpu.elementwise_inline_asm(nibble_asm(nibble, levels), args=[codes], constraints="=r,=r,r", pack=4,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, dtype)])[0]
    values = codes & 0xF if nibble == "low" else codes >> 4
    if codebook_ref is not None or lookup in ("select", "permute"):
        return _nf4_levels(values.astype(jnp.uint32), codebook_ref, lookup).astype(dtype)
    return lax.bitcast_convert_type(values.astype(jnp.uint16) | BF16_MAGIC_BITS, jnp.bfloat16).astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Format:
    fmt: str
    bits: int
    lookup: str  # NF4: "gather" or "select"
    int_decode: str  # int formats: "magic" or "convert"


class _Group:
    """Loads one scale group's per-column parameters as stored and dequantizes code tiles with them."""

    def __init__(self, spec: _Format, refs: dict, n: int):
        self.fmt, self.bits, self.lookup, self.refs, self.n = spec.fmt, spec.bits, spec.lookup, refs, n
        self.int_decode = spec.int_decode

    def load(self, group, first_col, block_n, col_mask):
        """(scale, zero, offset) [block_n] float32 for this group's columns: the weight is (float code - zero) * scale
        (+ offset), zero the zero point (0 with offsets; plus 2^23 for the "magic" decode) and offset the additive
        offset of QuantizedMatrix.offsets, else None; zero and offset None for nf4 (levels * scale)."""
        cols = pl.ds(first_col, block_n)
        fill = None if col_mask is None else 0
        if self.fmt == "nf4":
            refs = self.refs
            block = self.n // refs["scale_blocks"].shape[-1]
            col_index = (first_col + jnp.arange(block_n)) // block
            if col_mask is not None:
                col_index = jnp.where(col_mask, col_index, 0)
            scale_code = plgpu.load(refs["scale_codes"].at[group, cols], mask=col_mask, other=fill)
            group_index = jnp.full((block_n,), group, jnp.int32)
            block_scale = plgpu.load(refs["scale_blocks"].at[group_index, col_index])  # a gather: blocks straddle tiles
            mean = refs["scale_mean"][...]  # [1]
            return scale_code.astype(jnp.float32) * block_scale + mean, None, None

        def per_column(name):
            return plgpu.load(self.refs[name].at[group, cols], mask=col_mask, other=fill).astype(jnp.float32)

        offset = per_column("offsets") if "offsets" in self.refs else None
        if "zeros" in self.refs:
            zero = per_column("zeros")
        else:  # symmetric: the zero point is the middle code; with offsets none (code * scale + offset)
            zero = jnp.full((block_n,), 0 if offset is not None else 2 ** (self.bits - 1), jnp.float32)
        return per_column("scales"), zero + MAGIC if self.int_decode == "magic" else zero, offset

    def planes(self, codes, dtype, inline_asm: bool):
        """uint8 codes [block_n, rows] (a transposed tile) -> ([(values [block_n, rows] in dtype, factor)], bias).

        The step's product is sum_p factor_p * (values_p @ x_p), x_p x's even / odd columns for the two nibble planes of
        4-bit codes, x itself for int8's planes: with each value the code + bias (bias exact; int8 in two nibble
        planes, code = low + 16 high, bias 128 * 17), the zero point and the scale are applied to the step's product:
        sum_k (c_k - z) x_k = (sum_k (c_k + bias) x_k) - (z + bias) sum_k x_k. NF4: the levels, bias None.
        inline_asm: decode four codes per instruction group (`nibble_asm`), else the same values through jax.numpy
        (the interpreter's path, and int_decode="convert")."""
        if self.fmt == "nf4":  # "permute": the PTX table lookup (bf16 only), in the interpreter a select chain
            permute = self.lookup == "permute" and dtype == jnp.bfloat16 and inline_asm
            levels = _bf16_bits(NF4_CODEBOOK) if permute else None
            return [(_nibble_values(codes, nibble, dtype, permute, levels, self.refs.get("codebook"), self.lookup), 1)
                    for nibble in ("low", "high")], None
        if self.int_decode == "convert" or dtype != jnp.bfloat16:
            if self.bits == 4:
                return [((codes & 0xF).astype(dtype), 1), ((codes >> 4).astype(dtype), 1)], 0.0
            return [(codes.astype(dtype), 1)], 0.0
        planes = [(_nibble_values(codes, nibble, dtype, inline_asm), 1 if nibble == "low" or self.bits == 4 else 16)
                  for nibble in ("low", "high")]
        return planes, BF16_MAGIC if self.bits == 4 else BF16_MAGIC * 17

    def dequantize(self, codes, scale, zero, offset):
        """uint32 codes [rows, block_n] -> float32 weights [rows, block_n]: (code - zero) exactly, then * scale, then
        + offset (with offsets zero is 0, or exactly cancels the "magic" 2^23: code * scale + offset, bit-equal to
        the reference's)."""
        if self.fmt == "nf4":
            return _nf4_levels(codes, self.refs.get("codebook"), self.lookup) * scale[None, :]
        w = (_codes_to_float(codes, self.int_decode) - zero[None, :]) * scale[None, :]
        return w if offset is None else w + offset[None, :]


def deinterleave(x, parts: int) -> list:
    """x [..., n * parts] -> parts arrays [..., n], array i holding columns i, i + parts, i + 2 * parts, ...
    (parts a power of two; halving by even / odd pairs, which Triton lowers to register splits)."""
    if parts == 1:
        return [x]
    even, odd = lax.unstack(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), axis=x.ndim)
    evens, odds = deinterleave(even, parts // 2), deinterleave(odd, parts // 2)
    return [part for pair in zip(evens, odds) for part in pair]


def _split_length(split, steps: int, k_steps: int):
    """Steps of this split: `steps`, a static count when the splits divide K evenly, else the last one's rest."""
    return steps if k_steps % steps == 0 else jnp.minimum(steps, k_steps - split * steps)


def _gemv_kernel(*refs, spec: _Format, names: tuple, n: int, group_size: int, tiles: MatmulTiles, steps: int,
                 k_steps: int):
    """One program: input row r, columns [c * bn, (c + 1) * bn), K steps [s * steps, (s + 1) * steps)."""
    x_ref, codes_ref, *param_refs, out_ref = refs
    group = _Group(spec, dict(zip(names, param_refs)), n)
    bn, bk = tiles.block_n, tiles.block_k
    row, first_col, split = pl.program_id(0), pl.program_id(1) * bn, pl.program_id(2)
    col_mask = None if n % bn == 0 else first_col + jnp.arange(bn) < n
    tile_mask = combine_masks(None, col_mask)
    packed = group.bits == 4
    code_rows = bk // 2 if packed else bk

    def step(index, acc):  # acc [code_rows, bn] float32
        k_step = split * steps + index
        params = group.load((k_step * bk) // group_size, first_col, bn, col_mask)  # scale, zero, offset
        codes = plgpu.load(codes_ref.at[pl.ds(k_step * code_rows, code_rows), pl.ds(first_col, bn)], mask=tile_mask,
                           other=None if tile_mask is None else 0, eviction_policy="evict_first").astype(jnp.uint32)
        x = plgpu.load(x_ref.at[row, pl.ds(k_step * bk, bk)]).astype(jnp.float32)  # [bk]
        if packed:  # rows 2i / 2i + 1 of the step: x's even / odd columns
            x_even, x_odd = deinterleave(x, 2)
            acc = acc + x_even[:, None] * group.dequantize(codes & 0xF, *params)
            return acc + x_odd[:, None] * group.dequantize(codes >> 4, *params)
        return acc + x[:, None] * group.dequantize(codes, *params)

    acc = lax.fori_loop(0, _split_length(split, steps, k_steps), step, jnp.zeros((code_rows, bn), jnp.float32))
    index = (split, row, pl.ds(first_col, bn)) if tiles.splits > 1 else (row, pl.ds(first_col, bn))
    plgpu.store(out_ref.at[index], acc.sum(axis=0).astype(out_ref.dtype), mask=col_mask)


def _output_tile(m: int, n: int, tiles: MatmulTiles):
    """This program's first output row and column, its K split, and the row / column masks of its tile (None
    where the tile size divides the matrix)."""
    bm, bn = tiles.block_m, tiles.block_n
    first_row, first_col, split = pl.program_id(0) * bm, pl.program_id(1) * bn, pl.program_id(2)
    row_mask = None if m % bm == 0 else first_row + jnp.arange(bm) < m
    col_mask = None if n % bn == 0 else first_col + jnp.arange(bn) < n
    return first_row, first_col, split, row_mask, col_mask


def _dot_kernel(*refs, spec: _Format, names: tuple, m: int, n: int, k: int, group_size: int, tiles: MatmulTiles,
                steps: int, k_steps: int):
    """One program: the [bm, bn] output tile (r, c), K steps [s * steps, (s + 1) * steps)."""
    x_ref, codes_ref, *param_refs, out_ref = refs
    group = _Group(spec, dict(zip(names, param_refs)), n)
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    first_row, first_col, split, row_mask, col_mask = _output_tile(m, n, tiles)
    code_mask, out_mask = combine_masks(None, col_mask), combine_masks(row_mask, col_mask)
    x_mask = combine_masks(row_mask, None)
    rows = pl.ds(first_row, bm)

    def load_codes(start, count):  # uint32 [count, bn]
        return plgpu.load(codes_ref.at[pl.ds(start, count), pl.ds(first_col, bn)], mask=code_mask,
                          other=None if code_mask is None else 0).astype(jnp.uint32)

    def load_x(k_step):  # [bm, bk]
        return plgpu.load(x_ref.at[rows, pl.ds(k_step * bk, bk)], mask=x_mask, other=None if x_mask is None else 0)

    def dot(x, codes, params):
        w = group.dequantize(codes, *params).astype(x.dtype)
        return jnp.dot(x, w, preferred_element_type=jnp.float32)

    def step(index, acc):
        k_step = split * steps + index
        params = group.load((k_step * bk) // group_size, first_col, bn, col_mask)  # scale, zero, offset
        if group.bits == 3:  # three byte planes of k / 8 rows; word r of the step holds input rows 8r .. 8r + 7
            words, plane_rows = bk // 8, k // 8
            word = jnp.zeros((words, bn), jnp.uint32)
            for plane in range(3):
                word = word | (load_codes(plane * plane_rows + k_step * words, words) << (8 * plane))
            for i, x in enumerate(deinterleave(load_x(k_step), 8)):  # x[:, r] is input row 8r + i
                acc = acc + dot(x, (word >> (3 * i)) & 7, params)
            return acc
        if group.bits == 4:
            codes = load_codes(k_step * (bk // 2), bk // 2)
            x_even, x_odd = deinterleave(load_x(k_step), 2)
            acc = acc + dot(x_even, codes & 0xF, params)
            return acc + dot(x_odd, codes >> 4, params)
        return acc + dot(load_x(k_step), load_codes(k_step * bk, bk), params)

    acc = lax.fori_loop(0, _split_length(split, steps, k_steps), step, jnp.zeros((bm, bn), jnp.float32))
    index = (split, rows, pl.ds(first_col, bn)) if tiles.splits > 1 else (rows, pl.ds(first_col, bn))
    plgpu.store(out_ref.at[index], acc.astype(out_ref.dtype), mask=out_mask)


def _swap_ab_kernel(*refs, spec: _Format, names: tuple, m: int, n: int, k: int, group_size: int, tiles: MatmulTiles,
                    steps: int, k_steps: int):
    """One program: the output tile rows [r * bm, (r + 1) * bm) x columns [c * bn, (c + 1) * bn), K steps
    [s * steps, (s + 1) * steps), computed transposed: acc [bn, bm] += scale * (W^T - zero) [bn, bk] @ x^T [bk, bm]
    (+ offset * sum_k x^T [bk, bm] with offsets). The weights are the tensor cores' first operand, so bn (64 / 128)
    fills the 64-row MMA and x's few rows pad to bm = 16; the per-column scale (and offset) applies to the step's
    [bn, bm] partial product instead of every weight."""
    x_ref, codes_ref, *param_refs, out_ref = refs
    group = _Group(spec, dict(zip(names, param_refs)), n)
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    first_row, first_col, split, row_mask, col_mask = _output_tile(m, n, tiles)
    code_mask, x_mask, out_mask = combine_masks(None, col_mask), combine_masks(row_mask, None), \
        combine_masks(row_mask, col_mask)
    rows, cols = pl.ds(first_row, bm), pl.ds(first_col, bn)
    code_rows = bk // 2 if group.bits == 4 else bk

    def load(k_step):  # block_k step k_step's (scale, zero, offset) [bn], x [bm, bk] and uint8 codes [bn, code_rows]
        params = group.load((k_step * bk) // group_size, first_col, bn, col_mask)
        x = plgpu.load(x_ref.at[rows, pl.ds(k_step * bk, bk)], mask=x_mask, other=None if x_mask is None else 0)
        codes = plgpu.load(codes_ref.at[pl.ds(k_step * code_rows, code_rows), cols], mask=code_mask,
                           other=None if code_mask is None else 0).T
        return params, x, codes

    def product(params, x, codes):  # [bn, bm] float32: scale * ((W^T - zero) @ x^T) (+ offset * sum_k x^T), a step
        scale, zero, offset = params
        planes, bias = group.planes(codes, x.dtype, inline_asm=not tiles.interpret)
        x_parts = deinterleave(x, 2) if group.bits == 4 else [x] * len(planes)  # 4-bit: rows 2i / 2i + 1
        part = None
        for (values, factor), x_part in zip(planes, x_parts):
            if tiles.interpret:  # XLA:CPU lacks some bf16 x bf16 -> f32 dots; f32 is exact for these operands
                values, x_part = values.astype(jnp.float32), x_part.astype(jnp.float32)
            dot = lax.dot_general(values, x_part, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            dot = dot if factor == 1 else dot * factor
            part = dot if part is None else part + dot
        x_sum = jnp.sum(x.astype(jnp.float32), axis=1)[None, :] if bias is not None else None  # [1, bm]
        if bias is not None:  # subtract (zero + bias) * sum_k x_k (zero includes 2^23 for the "magic" decode)
            zero = zero - MAGIC if group.int_decode == "magic" else zero
            part = part - (zero + bias)[:, None] * x_sum
        part = scale[:, None] * part
        return part if offset is None else part + offset[:, None] * x_sum

    def step(index, acc):  # acc [bn, bm] float32
        return acc + product(*load(split * steps + index))

    acc = lax.fori_loop(0, _split_length(split, steps, k_steps), step, jnp.zeros((bn, bm), jnp.float32))
    index = (split, rows, cols) if tiles.splits > 1 else (rows, cols)
    plgpu.store(out_ref.at[index], acc.T.astype(out_ref.dtype), mask=out_mask)


def _group_inputs(qm: QuantizedMatrix, lookup: str) -> dict:
    """The per-group arrays as stored, by name (the kernel reads and converts them itself)."""
    if qm.format == "nf4":
        inputs = {"scale_codes": qm.scale_codes, "scale_blocks": qm.scale_blocks,
                  "scale_mean": qm.scale_mean.reshape(1).astype(jnp.float32)}
        if lookup == "gather":
            inputs["codebook"] = jnp.asarray(NF4_CODEBOOK)
        return inputs
    optional = {"zeros": qm.zeros, "offsets": qm.offsets}
    return {"scales": qm.scales, **{name: value for name, value in optional.items() if value is not None}}


@functools.partial(jax.jit, static_argnames=("tiles",))
def _call(x2d, qm: QuantizedMatrix, tiles: MatmulTiles):
    m, k = x2d.shape
    n = qm.out_features
    params = _group_inputs(qm, tiles.nf4_lookup)
    spec = _Format(qm.format, qm.bits, tiles.nf4_lookup, tiles.int_decode)
    k_steps = k // tiles.block_k
    common = dict(spec=spec, names=tuple(params), n=n, group_size=qm.group_size, tiles=tiles,
                  steps=split_steps(k_steps, tiles.splits), k_steps=k_steps)
    if tiles.block_m == 1:
        kernel, row_programs = functools.partial(_gemv_kernel, **common), m
    elif tiles.swap_ab:
        kernel, row_programs = functools.partial(_swap_ab_kernel, m=m, k=k, **common), pl.cdiv(m, tiles.block_m)
    else:
        kernel, row_programs = functools.partial(_dot_kernel, m=m, k=k, **common), pl.cdiv(m, tiles.block_m)
    split = tiles.splits > 1
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tiles.splits, m, n) if split else (m, n), jnp.float32 if split else x2d.dtype),
        grid=(row_programs, pl.cdiv(n, tiles.block_n), tiles.splits),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=tiles.interpret,
        name=f"matmul_{qm.format}_{'gemv' if tiles.block_m == 1 else 'swap_ab' if tiles.swap_ab else 'dot'}",
    )(x2d, qm.codes, *params.values())
    return out.sum(axis=0).astype(x2d.dtype) if split else out


def check_tiles(tiles: MatmulTiles, qm: QuantizedMatrix) -> None:
    """A clear error for tiles this matrix cannot run with."""
    k = qm.in_features
    unit = {4: 2, 3: 8}.get(qm.bits, 1)
    if qm.group_size % tiles.block_k or tiles.block_k % unit:
        raise ValueError(f"block_k={tiles.block_k} must divide the group size {qm.group_size} (and be even for 4-bit, "
                         f"a multiple of 8 for int3)")
    k_steps = k // tiles.block_k
    if not 1 <= tiles.splits <= k_steps or pl.cdiv(k_steps, split_steps(k_steps, tiles.splits)) != tiles.splits:
        raise ValueError(f"splits={tiles.splits}: K={k} has {k_steps} steps of block_k={tiles.block_k}; give 1 .. "
                         f"{k_steps} splits with at least one step each (choose_splits picks one)")
    dot_depth = tiles.block_k // unit  # the contraction length of each tensor-core dot
    if tiles.block_m > 1 and dot_depth < 16 and not tiles.interpret:
        raise ValueError(f"block_k={tiles.block_k} gives {qm.format} dots of depth {dot_depth}; tensor cores need 16 "
                         f"(block_k >= {16 * unit}, so a group size that is a multiple of it)")
    if tiles.block_m == 1 and qm.bits == 3:
        raise ValueError("the GEMV kernel (block_m=1) reads int8 / int4 / nf4; int3 takes block_m >= 16")
    if 1 < tiles.block_m < 16 and not tiles.interpret:
        raise ValueError(f"block_m={tiles.block_m}: tensor-core tiles need at least 16 rows (or 1 for the GEMV)")
    if tiles.nf4_lookup not in ("gather", "select", "permute"):
        raise ValueError(f"nf4_lookup={tiles.nf4_lookup!r}: expected 'gather', 'select' or 'permute'")
    if tiles.nf4_lookup == "permute" and not tiles.swap_ab:
        raise ValueError("nf4_lookup='permute' runs in the swap_ab kernel only (MatmulTiles(swap_ab=True))")
    if tiles.swap_ab and (qm.bits == 3 or tiles.block_m == 1):
        raise ValueError("swap_ab reads int8 / int4 / nf4 with block_m >= 16 (x's rows padded to the MMA's 16 columns)")
    if tiles.int_decode not in ("magic", "convert"):
        raise ValueError(f"int_decode={tiles.int_decode!r}: expected 'magic' or 'convert'")


def quantized_matmul_pallas(x: jax.Array, qm: QuantizedMatrix, *, tiles: MatmulTiles | None = None,
                            interpret: bool | None = None) -> jax.Array:
    """x [..., K] @ qm ([K, N], one matrix) -> [..., N] in x's dtype, float32 accumulation.
    interpret: run in Pallas interpret mode (default: when no GPU is present)."""
    if qm.lead_shape:
        raise ValueError(f"quantized_matmul_pallas takes one matrix; this one has leading axes {qm.lead_shape}")
    qm = standard_layout(qm)
    k = qm.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the quantized matrix expects {k}")
    x2d = x.reshape(-1, k)
    tiles = tiles or default_tiles(x2d.shape[0], k, qm.out_features, qm.group_size, interpret, qm.format)
    check_tiles(tiles, qm)
    return _call(x2d, qm, tiles).reshape(*x.shape[:-1], qm.out_features)


# --- the quantized matrix and the reference -----------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized weight: codes and scales as arrays, the format as static metadata (a pytree, so it passes
    through jit / scan / orbax like any parameter, and `x @ qm` dequantizes on the fly).

    codes   uint8 [*lead, in, out]; packed [*lead, in / 2, out] for 4-bit formats, [*lead, 3 * in / 8, out] for int3
    scales  float16 [*lead, groups, out] (int formats; None for nf4, whose scales are double-quantized)
    zeros   uint8 [*lead, groups, out] zero points (asymmetric int formats), else None
    offsets float16 [*lead, groups, out] additive offsets (int formats, zeros None), else None: the weight is
            code * scale + offset in float32, in that order (GGUF's Q4_1 and K-quant "min" forms, d * q + m,
            bit-equal to the gguf package's dequantizer), where without offsets it is (code - zero) * scale
    scale_codes / scale_blocks / scale_mean: nf4's double-quantized absmax scales:
            absmax ~ scale_codes [*lead, groups, out] (int8) * scale_blocks [*lead, groups, out / block]
            + scale_mean [*lead, 1, 1]
    """

    codes: jax.Array
    scales: jax.Array | None = None
    zeros: jax.Array | None = None
    offsets: jax.Array | None = None
    scale_codes: jax.Array | None = None
    scale_blocks: jax.Array | None = None
    scale_mean: jax.Array | None = None
    format: str = dataclasses.field(default="int8", metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    shape: tuple = dataclasses.field(default=(), metadata=dict(static=True))  # one matrix's original weight shape
    in_dims: int = dataclasses.field(default=1, metadata=dict(static=True))  # leading axes of `shape` contracted
    matmul: str = dataclasses.field(default="xla", metadata=dict(static=True))  # `x @ self`: "xla" or "pallas"
    # kernels.cpu_qmatvec.pack_int8_rows' layout: codes int8 [out, in] (code - 128), scales float32 [out, groups]
    cpu_packed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):  # only which fields are set: jax rebuilds the pytree with other leaves (tracers, specs)
        if self.offsets is not None and (self.format not in BITS or self.format == "nf4" or self.zeros is not None):
            raise QuantizationError(
                f"offsets (code * scale + offset) need an int format without zero points; got format "
                f"{self.format!r}{' with zeros' if self.zeros is not None else ''}: give either zeros "
                f"((code - zero) * scale) or offsets, and no offsets for nf4")

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
        """Bytes stored (codes, scales, zero points or offsets, double-quantization constants)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        """x [..., in] @ self, as `matmul` says: "xla" the reference (dequantize, then one matmul), "pallas" the
        fused kernel above, "matvec" `quantized_matvec`, "cpu" the int8 custom call of kernels.cpu_qmatvec (on a
        matrix it packed; an unpacked one is packed here, every call), "auto" `resolve_quantized_matmul`'s choice."""
        matmul = resolve_quantized_matmul(self.matmul, x, self)
        if matmul == "cpu":
            return q8_matvec(x, self if self.cpu_packed else pack_int8_rows(self))
        if matmul == "pallas":
            return quantized_matmul_pallas(x, self)
        if matmul == "matvec":
            return quantized_matvec(x, self)
        return quantized_matmul(x, self)

    def with_matmul(self, matmul: str) -> QuantizedMatrix:
        if matmul not in MATMUL_MODES:
            raise QuantizationError(f"matmul={matmul!r}: expected one of {', '.join(map(repr, MATMUL_MODES))}")
        return dataclasses.replace(self, matmul=matmul)


def nf4_absmax(qm: QuantizedMatrix) -> jax.Array:
    """NF4's dequantized absmax scales [*lead, groups, out] (float32)."""
    blocks = qm.scale_codes.reshape(*qm.scale_codes.shape[:-1], qm.scale_blocks.shape[-1], -1)
    return (blocks.astype(jnp.float32) * qm.scale_blocks[..., None]).reshape(qm.scale_codes.shape) + qm.scale_mean


def standard_layout(qm: QuantizedMatrix) -> QuantizedMatrix:
    """The matrix in the layout of the class docstring (a cpu_packed one unpacked: kernels.cpu_qmatvec)."""
    if not qm.cpu_packed:
        return qm
    return unpack_int8_rows(qm)


def unpacked_codes(qm: QuantizedMatrix) -> jax.Array:
    """Codes one per input row: uint8 [*lead, in, out]."""
    return unpack_codes(standard_layout(qm).codes, qm.bits)


def group_parameters(qm: QuantizedMatrix) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(scale, zero, offset), each [*lead, groups, out] float32 or None, such that a group's weight is
    (code - zero) * scale (zero points: stored, or the middle code when symmetric), code * scale + offset
    (offsets; zero None) or NF4[code] * scale (nf4: the double-quantized absmax; zero and offset None)."""
    if qm.format == "nf4":
        return nf4_absmax(qm), None, None
    qm = standard_layout(qm)
    scale = qm.scales.astype(jnp.float32)
    if qm.offsets is not None:
        return scale, None, qm.offsets.astype(jnp.float32)
    zero = (jnp.full(qm.scales.shape, 2 ** (qm.bits - 1), jnp.float32) if qm.zeros is None
            else qm.zeros.astype(jnp.float32))
    return scale, zero, None


def dequantize_matrix(qm: QuantizedMatrix, dtype=jnp.float32) -> jax.Array:
    """The [*lead, in, out] matrix the codes stand for (computed in float32, then cast to dtype)."""
    qm = standard_layout(qm)
    codes = unpacked_codes(qm)
    scale, zero, offset = (None if p is None else p[..., None, :] for p in group_parameters(qm))  # [.., groups, 1, out]
    grouped = group_rows(codes, qm.group_size)  # [*lead, groups, group, out]
    if qm.format == "nf4":
        values = jnp.asarray(NF4_CODEBOOK)[grouped.astype(jnp.int32)] * scale
    elif offset is not None:
        values = grouped.astype(jnp.float32) * scale + offset
    else:
        values = (grouped.astype(jnp.float32) - zero) * scale
    return values.reshape(codes.shape).astype(dtype)


def dequantize(qm: QuantizedMatrix, dtype=jnp.float32) -> jax.Array:
    """The weight in its original shape [*lead, *shape]."""
    return dequantize_matrix(qm, dtype).reshape(*qm.lead_shape, *qm.shape)


def quantized_matmul(x: jax.Array, qm: QuantizedMatrix) -> jax.Array:
    """x [..., in] @ the quantized [in, out] matrix -> [..., out] in x's dtype: the XLA reference of
    `quantized_matmul_pallas` (same signature), which dequantizes the whole matrix and lets XLA fuse the
    conversion into the dot where it can."""
    if qm.lead_shape:
        raise QuantizationError(f"quantized_matmul takes one matrix; this one has leading axes {qm.lead_shape}")
    if compute_platform(x) == "cpu":
        # The dequantization depends on the weights only, so XLA's CPU scheduler runs every layer's first, keeping
        # them all alive in float32 (a 135M-parameter model's prefill wrote 425 MB before its first matmul), and
        # hoists it out of a decoding loop (one float copy of the weights, read every step). Tied to x, each matrix
        # is dequantized when its product is due, and in a loop every step.
        x, qm = lax.optimization_barrier((x, qm))
    return jnp.matmul(x, dequantize_matrix(qm, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


quantized_matmul_reference = quantized_matmul


# --- few rows on CPUs ------------------------------------------------------------------------

MATMUL_MODES = (*MATMULS, "cpu")  # "cpu": kernels.cpu_qmatvec (an int8 custom call; CPUs)
MATVEC_FORMATS = ("int8", "int4")
MATVEC_MAX_ROWS = 8  # "auto" on CPUs: quantized_matvec up to this many rows (its cost grows with the rows; at 8 rows
# it still took 0.77x the reference's time on a 576 x 3072 int4 matrix, 2 cores)
MATVEC_BLOCK = 32  # input rows a block sums as written-out adds: at most this many, a divisor of the group size


def resolve_quantized_matmul(matmul: str, x: jax.Array, qm: QuantizedMatrix) -> str:
    """How `x @ qm` runs: "xla", "pallas", "matvec" or "cpu" as asked; "auto": the fused Pallas kernel on GPUs,
    on CPUs the int8 custom call for a matrix kernels.cpu_qmatvec packed (llmjax.quant.model.quantized_decode_params
    packs once where the kernel is available), `quantized_matvec` for int8 / int4 at most MATVEC_MAX_ROWS rows
    (decoding), else the XLA reference. A packed matrix always takes "cpu" (which falls back by itself)."""
    if matmul not in MATMUL_MODES:
        raise QuantizationError(f"matmul={matmul!r}: expected one of {', '.join(map(repr, MATMUL_MODES))}")
    if qm.cpu_packed:
        return "cpu"
    if matmul != "auto":
        return matmul
    platform = compute_platform(x)
    if platform == "gpu":
        return "pallas"
    rows = math.prod(x.shape[:-1])
    if platform == "cpu" and qm.format in MATVEC_FORMATS and not qm.lead_shape and rows <= MATVEC_MAX_ROWS:
        return "matvec"
    return "xla"


def _matvec_block(group_size: int, bits: int) -> int:
    """Input rows per written-out block: the largest divisor of the group size up to MATVEC_BLOCK (even for 4-bit
    codes, two rows to a byte)."""
    return max(d for d in range(1, min(group_size, MATVEC_BLOCK) + 1)
               if group_size % d == 0 and (bits != 4 or d % 2 == 0))


def _sum_slices(t: jax.Array, axis: int) -> jax.Array:
    """Sum over `axis` written as adds of its slices: an elementwise expression XLA fuses into one vectorised loop
    over the other axes, where a reduce fusion (jnp.sum) runs the reduction innermost, one output at a time."""
    total = lax.slice_in_dim(t, 0, 1, axis=axis)
    for i in range(1, t.shape[axis]):
        total = total + lax.slice_in_dim(t, i, i + 1, axis=axis)
    return lax.squeeze(total, (axis,))


def quantized_matvec(x: jax.Array, qm: QuantizedMatrix) -> jax.Array:
    """x [..., in] @ qm ([in, out], int8 or int4, one matrix) -> [..., out] in x's dtype, float32 arithmetic:
    the product for a few rows (decoding) written so XLA on a CPU reads the codes once, in one vectorised loop,
    without a float copy of the matrix.

    XLA's CPU dot takes float operands, so the reference dequantizes the whole matrix (4 bytes written and read
    again per weight, every step) and a reduce fusion (jnp.sum over a group's rows) runs its reduction innermost,
    one output at a time. Here the rows of each block of `_matvec_block` input rows (within one group) are added
    as written-out terms, x[r] * code[r, :] over the block's r, an elementwise expression over [rows, blocks, out]
    that XLA fuses into one loop vectorised along the output columns (and split over the cores); the scale and
    the offset or zero point are applied once per block, not per weight:

        sum_r x_r (c_r s + m) = s sum_r x_r c_r + m sum_r x_r        (offsets)
        sum_r x_r (c_r - z) s = s (sum_r x_r c_r - z sum_r x_r)      (zero points; symmetric: z = 2^(bits-1))

    and the blocks' partial sums [rows, blocks, out] are added the same way. The result equals the reference within
    float32 rounding (the sums run in another order). Other formats (int3, nf4) and stacked matrices: the reference."""
    if qm.lead_shape:
        raise QuantizationError(f"quantized_matvec takes one matrix; this one has leading axes {qm.lead_shape}")
    qm = standard_layout(qm)
    k, n = qm.in_features, qm.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the quantized matrix expects {k}")
    if qm.format not in MATVEC_FORMATS:
        return quantized_matmul(x, qm)
    return _matvec(x.reshape(-1, k), qm).reshape(*x.shape[:-1], n)


@jax.jit
def _matvec(x: jax.Array, qm: QuantizedMatrix) -> jax.Array:
    """quantized_matvec on x [rows, in] (jitted: traced once per shape and format, however many layers call it)."""
    k, n = qm.in_features, qm.out_features
    block = _matvec_block(qm.group_size, qm.bits)
    blocks, per_group = k // block, qm.group_size // block
    # One barrier over x and the matrix: x's producers (a norm, the previous layer) stay out of the loop below, which
    # would compute them again for every term and output column; and the conversion of the codes and scales cannot
    # be hoisted out of a decoding while-loop (the weights are loop-invariant: XLA would convert them to float32 once,
    # before the loop, and every step would read 4 bytes per weight)
    xb = x.reshape(-1, blocks, block).astype(jnp.float32)  # [rows, blocks, block]
    xb, qm = lax.optimization_barrier((xb, qm))
    # Every operand is broadcast to [rows, blocks, block rows, out] once and each term is slices of those (no
    # per-term reshapes or broadcasts: a third of the HLO ops, which is what compiling 120 of these takes time over)
    rows, code_rows = xb.shape[0], qm.codes.shape[0] // blocks
    shape = (rows, blocks, code_rows, n)
    spread = lambda a: lax.broadcast_in_dim(a, shape, (0, 1, 2))  # noqa: E731  x's [rows, blocks, code_rows]
    codes = lax.broadcast_in_dim(qm.codes.reshape(blocks, code_rows, n), shape, (1, 2, 3))
    row = lambda a, j: lax.slice_in_dim(a, j, j + 1, axis=2)  # noqa: E731  [rows, blocks, 1, out]
    to_float = lambda a: lax.convert_element_type(a, jnp.float32)  # noqa: E731
    if qm.bits == 4:
        # Byte j of a block holds rows 2j (low nibble) and 2j + 1 (high): byte = low + 16 high, so
        # x_2j low + x_2j+1 high = low (x_2j - x_2j+1 / 16) + byte (x_2j+1 / 16), exactly in real numbers: a mask
        # and two conversions per byte, no shift (XLA guards a vector shift with range checks)
        x_high = xb[:, :, 1::2] * (1 / 16)
        x_low, x_high = spread(xb[:, :, 0::2] - x_high), spread(x_high)
        low_mask = jnp.full((rows, blocks, 1, n), 0xF, jnp.uint8)  # per term: masked codes used once are not written
        terms = []
        for j in range(code_rows):
            terms.append(row(x_low, j) * to_float(row(codes, j) & low_mask))
            terms.append(row(x_high, j) * to_float(row(codes, j)))
    else:
        x_rows = spread(xb)
        terms = [row(x_rows, r) * to_float(row(codes, r)) for r in range(code_rows)]
    # Each term is computed from the codes where it is used (a product feeding several slices would be written to
    # memory whole: the float matrix); summed pairwise, for short dependency chains (XLA keeps the order written)
    while len(terms) > 1:
        terms = [a + b for a, b in zip(terms[0::2], terms[1::2])] + terms[len(terms) - len(terms) % 2:]
    dot = terms[0].reshape(rows, blocks, n)  # sum_r x_r c_r per block
    x_sum = jnp.sum(xb, axis=-1)[..., None]  # [rows, blocks, 1]
    per_block = lambda p: jnp.broadcast_to(p[:, None, :], (p.shape[0], per_group, n)).reshape(blocks, n)  # noqa: E731
    scale, zero, offset = group_parameters(qm)  # [groups, out] each
    if offset is not None:
        partial = dot * per_block(scale) + x_sum * per_block(offset)
    else:
        partial = (dot - x_sum * per_block(zero)) * per_block(scale)
    return _sum_slices(partial, axis=1).astype(x.dtype)  # [rows, out]


# --- the CPU int8 custom call's layout (kernels.cpu_qmatvec) --------------------------------------------------


def can_pack(qm: QuantizedMatrix) -> bool:
    """A symmetric int8 matrix (no zero points, no offsets) of one [in, out] matrix, in and group multiples of 32."""
    return (isinstance(qm, QuantizedMatrix) and not qm.cpu_packed and qm.format == "int8" and qm.zeros is None
            and qm.offsets is None and not qm.lead_shape and qm.group_size % cpu_qmatvec.BLOCK == 0
            and qm.in_features % cpu_qmatvec.BLOCK == 0)


@jax.jit
def _pack_int8_rows(codes, scales):
    codes_s8 = (codes.astype(jnp.int16) - cpu_qmatvec.ZERO).astype(jnp.int8).T  # [out, in]
    return codes_s8, scales.astype(jnp.float32).T  # [out, groups]


def pack_int8_rows(qm: QuantizedMatrix) -> QuantizedMatrix:
    """The matrix in the kernel's layout: codes int8 [out, in] (code - 128), scales float32 [out, groups], matmul
    "cpu" and cpu_packed set (shape, group size unchanged: it still stands for the same [in, out] weight)."""
    if not can_pack(qm):
        raise QuantizationError(
            f"pack_int8_rows takes one symmetric int8 matrix with in and group multiples of {cpu_qmatvec.BLOCK}; got "
            f"format {qm.format!r}, group {qm.group_size}, in {qm.in_features}, leading axes {qm.lead_shape}"
            f"{', zero points' if qm.zeros is not None else ''}{', offsets' if qm.offsets is not None else ''}"
            f"{', already packed' if qm.cpu_packed else ''}")
    codes, scales = _pack_int8_rows(qm.codes, qm.scales)
    return dataclasses.replace(qm, codes=codes, scales=scales, matmul="cpu", cpu_packed=True)


def unpack_int8_rows(packed: QuantizedMatrix) -> QuantizedMatrix:
    """pack_int8_rows undone: uint8 codes [in, out], float16 scales [groups, out] (exact: they came from float16)."""
    codes = (packed.codes.T.astype(jnp.int16) + cpu_qmatvec.ZERO).astype(jnp.uint8)
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
    if compute_platform(x) != "cpu" or not cpu_qmatvec.available():
        return quantized_matvec(x, unpack_int8_rows(packed))
    y = cpu_qmatvec.int8_rows_matvec(x.reshape(-1, k), packed.codes, packed.scales)  # [rows, out]
    return y.reshape(*x.shape[:-1], n).astype(x.dtype)
