"""Fused RMSNorm and LayerNorm in Pallas (Triton lowering), forward and backward.

One pass over the rows each way. The forward reads x once, writes y and keeps per-row float32
statistics (mean, 1 / rms) for the backward. The backward reads x and dy once, writes dx, and
reduces dscale / dbias across rows in the same pass: a persistent grid of `programs` programs, each
walking its own contiguous run of row tiles and summing its partial dscale / dbias in registers,
then one small XLA sum over the [programs, d] partials.

Rows narrower than `MAX_ROW_ELEMENTS` are held whole in registers (a [block_rows, d_pad] tile,
d_pad the next power of two); wider rows are walked in chunks of `block_d` columns (two or three
passes over the row, the later ones from cache).

The references, `layer_norm_reference` / `rms_norm_reference` at the bottom of this file, are plain jnp
with the kernels' signatures: statistics in float32, output in x.dtype (the same math as llmjax.nn's
layer_norm / rms_norm). Gradients come back in each input's own dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .platform import compute_device
from .tiles import combine_masks
from .tuning import load_tables, table_entry

__all__ = ["layer_norm", "rms_norm", "layer_norm_reference", "rms_norm_reference"]

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_ROW_ELEMENTS = 16384  # widest row (padded to a power of two) held whole in registers
PASSES = ("forward", "backward")


def width_defaults(tables: dict) -> dict[tuple[str, int], dict]:
    """("forward" | "backward", padded width) -> the overrides of that pass's defaults, from the tuning tables."""
    return {(which, int(width)): dict(overrides) for which in PASSES
            for width, overrides in table_entry(tables, (which, "by_padded_width"), "norms").items()}


# Per-pass defaults (a tile of about this many elements, warps capped so, Triton pipelining stages, backward
# programs per multiprocessor) and their overrides per padded row width: tuned data, with the device it was tuned
# on, in kernels/tuning/norms.json (how it was measured: docs/perf.md, "Fused norms and cross-entropy").
NORM_TABLES = load_tables("norms")
FORWARD_DEFAULTS = dict(table_entry(NORM_TABLES, ("forward", "defaults"), "norms"))
BACKWARD_DEFAULTS = dict(table_entry(NORM_TABLES, ("backward", "defaults"), "norms"))
WIDTH_DEFAULTS = width_defaults(NORM_TABLES)

FORWARD_TUNING = ("block_rows", "block_d", "num_warps", "num_stages", "one_pass")
BACKWARD_TUNING = ("block_rows", "block_d", "num_warps", "num_stages", "programs")


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Static shape of one norm launch (hashable: a custom_vjp non-differentiable argument)."""

    eps: float
    subtract_mean: bool  # LayerNorm: True; RMSNorm: False
    rows: int
    d: int
    block_rows: int  # rows per tile (power of two)
    block_d: int  # columns per chunk (power of two); >= d means whole rows
    num_warps: int
    num_stages: int
    programs: int  # backward's persistent grid
    interpret: bool
    # LayerNorm forward: mean and variance from one sweep of sums (var = E[x^2] - mean^2, two independent row
    # reductions) instead of the mean first and then the centred squares (two dependent ones; one more pass
    # over x when rows are chunked).
    one_pass: bool = False

    @property
    def num_chunks(self) -> int:
        return pl.cdiv(self.d, self.block_d)

    @property
    def num_tiles(self) -> int:
        return pl.cdiv(self.rows, self.block_rows)

    @property
    def tiles_per_program(self) -> int:
        return pl.cdiv(self.num_tiles, self.programs)

    @property
    def padded_d(self) -> int:
        return self.num_chunks * self.block_d


# --- validation and launch shape ---------------------------------------------------------

def _check_inputs(x, scale, bias, eps) -> None:
    """Raise one clear error for input the kernels do not take (before any tracing)."""
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"norm input must have a non-empty last axis to normalize over, got shape {x.shape}")
    d = x.shape[-1]
    named = [("x", x), ("scale", scale)] + ([] if bias is None else [("bias", bias)])
    for name, array in named:
        if jnp.dtype(array.dtype) not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
            raise TypeError(f"norm kernels take float32, bfloat16 or float16; {name} is {jnp.dtype(array.dtype).name}")
    for name, array in named[1:]:
        if array.shape != (d,):
            raise ValueError(f"{name} must have shape ({d},) to match x's last axis (x {x.shape}), got {array.shape}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative Python number, got {eps!r}")


def _default_programs(per_multiprocessor: int) -> int:
    """Backward's persistent grid: a few programs per multiprocessor (8 where there is no GPU)."""
    device = compute_device()
    if device.platform != "gpu":
        return 8
    return per_multiprocessor * (getattr(device, "core_count", None) or 132)


def _check_tuning(name: str, tuning: dict | None, allowed: tuple[str, ...]) -> dict:
    tuning = dict(tuning or {})
    unknown = sorted(set(tuning) - set(allowed))
    if unknown:
        raise ValueError(f"{name} tuning takes {', '.join(allowed)}; got {', '.join(unknown)}")
    return tuning


def pass_defaults(which: str, d: int) -> dict:
    """The defaults of one pass ("forward" / "backward") for rows of width d."""
    base = FORWARD_DEFAULTS if which == "forward" else BACKWARD_DEFAULTS
    return {**base, **WIDTH_DEFAULTS.get((which, pl.next_power_of_2(d)), {})}


def _make_config(x, eps, subtract_mean, interpret, defaults: dict, block_rows=None, block_d=None, programs=None,
                 num_warps=None, num_stages=None, one_pass=None) -> NormConfig:
    """One pass's launch shape: the tuning given, the rest from `defaults` (`pass_defaults`)."""
    d = x.shape[-1]
    rows = x.size // d
    padded_d = pl.next_power_of_2(d)
    if block_d is None:
        block_d = padded_d if padded_d <= MAX_ROW_ELEMENTS else 4096
    if block_rows is None:
        block_rows = max(1, min(64, defaults["tile_elements"] // min(block_d, padded_d)))
    for name, value in (("block_rows", block_rows), ("block_d", block_d)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    tile = block_rows * min(block_d, padded_d)
    num_warps = num_warps or defaults.get("num_warps") or max(1, min(defaults["max_warps"], tile // 512))
    num_tiles = pl.cdiv(rows, block_rows)
    programs = programs or _default_programs(defaults.get("programs_per_multiprocessor", 1))
    one_pass = defaults.get("one_pass", False) if one_pass is None else bool(one_pass)
    return NormConfig(float(eps), subtract_mean, rows, d, block_rows, block_d, num_warps,
                      num_stages or defaults["num_stages"], max(1, min(programs, num_tiles)), interpret,
                      one_pass and subtract_mean)


# --- kernels -----------------------------------------------------------------------------

def _row_mask(cfg: NormConfig, first_row) -> jax.Array | None:
    """[block_rows] True for rows that exist, or None when every tile is full."""
    if cfg.rows % cfg.block_rows == 0 and cfg.num_tiles == cfg.programs * cfg.tiles_per_program:
        return None
    return first_row + jnp.arange(cfg.block_rows) < cfg.rows


def _col_mask(cfg: NormConfig, first_col) -> jax.Array | None:
    """[block_d] True for columns that exist, or None when chunks tile d exactly."""
    if cfg.d % cfg.block_d == 0:
        return None
    return first_col + jnp.arange(cfg.block_d) < cfg.d


def _load_tile(ref, cfg, first_row, first_col, row_mask) -> jax.Array:
    """[block_rows, block_d] float32 tile of a [rows, d] ref, zeros outside it."""
    mask = combine_masks(row_mask, _col_mask(cfg, first_col))
    block = ref.at[pl.ds(first_row, cfg.block_rows), pl.ds(first_col, cfg.block_d)]
    other = None if mask is None else 0.0
    return plgpu.load(block, mask=mask, other=other).astype(jnp.float32)


def _store_tile(ref, value, cfg, first_row, first_col, row_mask) -> None:
    mask = combine_masks(row_mask, _col_mask(cfg, first_col))
    block = ref.at[pl.ds(first_row, cfg.block_rows), pl.ds(first_col, cfg.block_d)]
    plgpu.store(block, value.astype(ref.dtype), mask=mask)


def _load_vector(ref, cfg, first_col) -> jax.Array:
    """[block_d] float32 chunk of a [d] parameter, zeros outside it."""
    if ref is None:
        return jnp.zeros((cfg.block_d,), jnp.float32)
    mask = _col_mask(cfg, first_col)
    block = ref.at[pl.ds(first_col, cfg.block_d)]
    return plgpu.load(block, mask=mask, other=None if mask is None else 0.0).astype(jnp.float32)


def _store_rows(ref, value, first_row, cfg, row_mask) -> None:
    plgpu.store(ref.at[pl.ds(first_row, cfg.block_rows)], value, mask=row_mask)


def _load_rows(ref, first_row, cfg, row_mask) -> jax.Array:
    return plgpu.load(ref.at[pl.ds(first_row, cfg.block_rows)], mask=row_mask, other=None if row_mask is None else 0.0)


def _chunk_sum(cfg: NormConfig, body, init):
    """Sum over column chunks of body(first_col) (a [block_rows] array or a tuple of them)."""
    add = lambda c, acc: jax.tree.map(jnp.add, acc, body(c * cfg.block_d))  # noqa: E731
    return lax.fori_loop(0, cfg.num_chunks, add, init)


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, cfg: NormConfig):
    """One tile of rows: statistics in float32, y = (x - mean) * rstd * scale + bias."""
    first_row = pl.program_id(0) * cfg.block_rows
    row_mask = _row_mask(cfg, first_row)
    load_x = functools.partial(_load_tile, x_ref, cfg, first_row, row_mask=row_mask)
    zeros = jnp.zeros((cfg.block_rows,), jnp.float32)

    def centered(x, first_col, mean):  # [block_rows, block_d], zero outside d
        if not cfg.subtract_mean:
            return x
        col_mask = _col_mask(cfg, first_col)
        x = x - mean[:, None]
        return x if col_mask is None else jnp.where(col_mask[None, :], x, 0.0)

    def write(x, first_col, mean, rstd):
        y = x * rstd[:, None] * _load_vector(scale_ref, cfg, first_col) + _load_vector(bias_ref, cfg, first_col)
        _store_tile(y_ref, y, cfg, first_row, first_col, row_mask)

    # One-pass statistics on shifted data: with k = the row's first element, mean = k + E[x - k] and
    # var = E[(x - k)^2] - E[x - k]^2, which stays accurate when |mean| >> std (k is a sample of the row).
    shift = (plgpu.load(x_ref.at[pl.ds(first_row, cfg.block_rows), pl.ds(0, 1)], mask=None if row_mask is None
                        else row_mask[:, None], other=None if row_mask is None else 0.0).astype(jnp.float32)
             if cfg.one_pass else None)  # [block_rows, 1]

    def shifted_sums(x, first_col):  # (sum (x - k), sum (x - k)^2) over the columns that exist
        x = centered(x, first_col, shift[:, 0])
        return x.sum(1), (x * x).sum(1)

    def one_pass_statistics(sums, squares):
        shifted_mean = sums / cfg.d
        variance = jnp.maximum(squares / cfg.d - shifted_mean * shifted_mean, 0.0)
        return shift[:, 0] + shifted_mean, lax.rsqrt(variance + cfg.eps)

    if cfg.num_chunks == 1:  # the whole row stays in registers
        x = load_x(0)
        if cfg.one_pass:
            mean, rstd = one_pass_statistics(*shifted_sums(x, 0))
            x = centered(x, 0, mean)
        else:
            mean = x.sum(1) / cfg.d if cfg.subtract_mean else zeros
            x = centered(x, 0, mean)
            rstd = lax.rsqrt((x * x).sum(1) / cfg.d + cfg.eps)
        write(x, 0, mean, rstd)
    elif cfg.one_pass:
        mean, rstd = one_pass_statistics(*_chunk_sum(cfg, lambda col: shifted_sums(load_x(col), col), (zeros, zeros)))

        @pl.loop(0, cfg.num_chunks)
        def _(c):
            write(centered(load_x(c * cfg.block_d), c * cfg.block_d, mean), c * cfg.block_d, mean, rstd)
    else:
        mean = _chunk_sum(cfg, lambda col: load_x(col).sum(1), zeros) / cfg.d if cfg.subtract_mean else zeros
        squares = _chunk_sum(cfg, lambda col: jnp.square(centered(load_x(col), col, mean)).sum(1), zeros)
        rstd = lax.rsqrt(squares / cfg.d + cfg.eps)

        @pl.loop(0, cfg.num_chunks)
        def _(c):
            write(centered(load_x(c * cfg.block_d), c * cfg.block_d, mean), c * cfg.block_d, mean, rstd)

    if mean_ref is not None:
        _store_rows(mean_ref, mean, first_row, cfg, row_mask)
    _store_rows(rstd_ref, rstd, first_row, cfg, row_mask)


def _backward_kernel(x_ref, scale_ref, dy_ref, mean_ref, rstd_ref, dx_ref, dscale_ref, dbias_ref, *, cfg: NormConfig):
    """A run of row tiles: dx per row; this program's partial sums of dscale, dbias over its rows.

    With g = dy * scale and xhat = (x - mean) * rstd:
      dx = rstd * (g - mean_d(g) - xhat * mean_d(g * xhat))   (RMSNorm: without the mean_d(g) term)
      dscale = sum_rows dy * xhat;  dbias = sum_rows dy
    """
    program = pl.program_id(0)
    zeros = jnp.zeros((cfg.block_rows,), jnp.float32)

    def tile_rows(t):
        first_row = (program * cfg.tiles_per_program + t) * cfg.block_rows
        row_mask = _row_mask(cfg, first_row)
        mean = _load_rows(mean_ref, first_row, cfg, row_mask) if cfg.subtract_mean else zeros
        return first_row, row_mask, mean, _load_rows(rstd_ref, first_row, cfg, row_mask)

    def chunk(first_row, row_mask, mean, rstd, first_col):
        """(dy, xhat, g) on one [block_rows, block_d] chunk, float32."""
        dy = _load_tile(dy_ref, cfg, first_row, first_col, row_mask)
        xhat = (_load_tile(x_ref, cfg, first_row, first_col, row_mask) - mean[:, None]) * rstd[:, None]
        return dy, xhat, dy * _load_vector(scale_ref, cfg, first_col)[None, :]

    def dx_of(g, xhat, rstd, mean_g, mean_gx):
        return rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])

    def partial_row(ref):  # this program's [1, block_d] chunk of the partial sums
        return lambda first_col: ref.at[pl.ds(program, 1), pl.ds(first_col, cfg.block_d)]

    if cfg.num_chunks == 1:  # whole rows: the partial sums stay in registers across tiles
        def one_tile(t, sums):
            first_row, row_mask, mean, rstd = tile_rows(t)
            dy, xhat, g = chunk(first_row, row_mask, mean, rstd, 0)
            mean_g = g.sum(1) / cfg.d if cfg.subtract_mean else zeros
            mean_gx = (g * xhat).sum(1) / cfg.d
            _store_tile(dx_ref, dx_of(g, xhat, rstd, mean_g, mean_gx), cfg, first_row, 0, row_mask)
            return sums[0] + (dy * xhat).sum(0), sums[1] + dy.sum(0)

        vector_zeros = jnp.zeros((cfg.block_d,), jnp.float32)
        dscale, dbias = lax.fori_loop(0, cfg.tiles_per_program, one_tile, (vector_zeros, vector_zeros))
        plgpu.store(partial_row(dscale_ref)(0), dscale[None, :])
        if dbias_ref is not None:
            plgpu.store(partial_row(dbias_ref)(0), dbias[None, :])
        return

    partial_refs = [partial_row(dscale_ref)] + ([] if dbias_ref is None else [partial_row(dbias_ref)])

    @pl.loop(0, cfg.num_chunks)
    def _(c):
        for block in partial_refs:
            plgpu.store(block(c * cfg.block_d), jnp.zeros((1, cfg.block_d), jnp.float32))

    @pl.loop(0, cfg.tiles_per_program)
    def _(t):
        first_row, row_mask, mean, rstd = tile_rows(t)
        chunk_at = functools.partial(chunk, first_row, row_mask, mean, rstd)
        def row_sums(first_col):  # (sum_d g, sum_d g * xhat), each [block_rows]
            _, xhat, g = chunk_at(first_col)
            return g.sum(1), (g * xhat).sum(1)

        sum_g, sum_gx = _chunk_sum(cfg, row_sums, (zeros, zeros))
        mean_g = sum_g / cfg.d if cfg.subtract_mean else zeros
        mean_gx = sum_gx / cfg.d

        @pl.loop(0, cfg.num_chunks)
        def _(c):
            first_col = c * cfg.block_d
            dy, xhat, g = chunk_at(first_col)
            _store_tile(dx_ref, dx_of(g, xhat, rstd, mean_g, mean_gx), cfg, first_row, first_col, row_mask)
            for block, term in zip(partial_refs, (dy * xhat, dy)):
                plgpu.store(block(first_col), plgpu.load(block(first_col)) + term.sum(0)[None, :])


# --- launches ----------------------------------------------------------------------------

def _pallas(kernel, inputs, out_shapes, cfg: NormConfig, grid: int, name: str) -> list:
    """pallas_call over the inputs / outputs that are not None; the kernel gets None for the rest."""
    has_input = [a is not None for a in inputs]
    has_output = [s is not None for s in out_shapes]

    def with_absent_refs(*refs):
        refs = iter(refs)
        kernel(*[next(refs) if present else None for present in has_input + has_output], cfg=cfg)

    results = iter(pl.pallas_call(
        with_absent_refs,
        out_shape=[s for s in out_shapes if s is not None],
        grid=(grid,),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name=name,
    )(*[a for a in inputs if a is not None]))
    return [next(results) if present else None for present in has_output]


def _kind(cfg: NormConfig) -> str:
    return "layer_norm" if cfg.subtract_mean else "rms_norm"


def _forward(x, scale, bias, cfg: NormConfig):
    """x [rows, d] -> (y [rows, d] x.dtype, mean [rows] f32 or None, rstd [rows] f32)."""
    stats = jax.ShapeDtypeStruct((cfg.rows,), jnp.float32)
    out_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype), stats if cfg.subtract_mean else None, stats]
    y, mean, rstd = _pallas(_forward_kernel, [x, scale, bias], out_shapes, cfg, cfg.num_tiles, _kind(cfg) + "_forward")
    return y, mean, rstd


def _backward(x, scale, has_bias, mean, rstd, dy, cfg: NormConfig):
    """-> (dx [rows, d] x.dtype, dscale [d] f32, dbias [d] f32 or None)."""
    partials = jax.ShapeDtypeStruct((cfg.programs, cfg.padded_d), jnp.float32)  # [programs, padded_d]
    out_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype), partials, partials if has_bias else None]
    dx, dscale, dbias = _pallas(
        _backward_kernel, [x, scale, dy, mean, rstd], out_shapes, cfg, cfg.programs, _kind(cfg) + "_backward"
    )
    reduce = lambda p: None if p is None else p.sum(0)[: cfg.d]  # noqa: E731
    return dx, reduce(dscale), reduce(dbias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x, scale, bias, configs: tuple[NormConfig, NormConfig]):
    """x [rows, d] -> y [rows, d]; bias may be None (RMSNorm). configs: (forward's, backward's)."""
    return _forward(x, scale, bias, configs[0])[0]


def _normalize_forward(x, scale, bias, configs):
    y, mean, rstd = _forward(x, scale, bias, configs[0])
    return y, (x, scale, None if bias is None else jnp.zeros((0,), bias.dtype), mean, rstd)


def _normalize_backward(configs, residuals, dy):
    x, scale, bias_marker, mean, rstd = residuals
    dx, dscale, dbias = _backward(x, scale, bias_marker is not None, mean, rstd, dy, configs[1])
    dbias = None if dbias is None else dbias.astype(bias_marker.dtype)
    return dx, dscale.astype(scale.dtype), dbias


_normalize.defvjp(_normalize_forward, _normalize_backward)


def _apply(x, scale, bias, eps, subtract_mean, interpret, forward: dict | None, backward: dict | None):
    _check_inputs(x, scale, bias, eps)
    forward = _check_tuning("forward", forward, FORWARD_TUNING)
    backward = _check_tuning("backward", backward, BACKWARD_TUNING)
    if x.size == 0:
        return x
    d = x.shape[-1]
    configs = (_make_config(x, eps, subtract_mean, interpret, pass_defaults("forward", d), **forward),
               _make_config(x, eps, subtract_mean, interpret, pass_defaults("backward", d), **backward))
    return _normalize(x.reshape(-1, d), scale, bias, configs).reshape(x.shape)


# --- public API --------------------------------------------------------------------------

def rms_norm(
    x: jax.Array,
    scale: jax.Array,
    eps: float,
    *,
    interpret: bool = False,
    forward: dict | None = None,
    backward: dict | None = None,
) -> jax.Array:
    """x [..., d] / rms(x) * scale, statistics in float32, output in x.dtype; as `rms_norm_reference`.

    interpret: run the Pallas kernels on the CPU (tests). forward / backward: tuning of each pass, overriding
    the per-width defaults (`pass_defaults`): block_rows, block_d (powers of two: rows per tile, columns per
    chunk), num_warps, num_stages (Triton's); the forward's one_pass (LayerNorm: mean and variance from one
    sweep of shifted sums), the backward's programs (its persistent grid).
    """
    return _apply(x, scale, None, eps, False, interpret, forward, backward)


def layer_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    eps: float,
    *,
    interpret: bool = False,
    forward: dict | None = None,
    backward: dict | None = None,
) -> jax.Array:
    """(x [..., d] - mean) / std * scale + bias, statistics in float32, output in x.dtype; as
    `layer_norm_reference`. interpret, forward and backward as in `rms_norm`."""
    return _apply(x, scale, bias, eps, True, interpret, forward, backward)


# --- references --------------------------------------------------------------------------

def rms_norm_reference(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x [..., d] / sqrt(mean(x^2) + eps) * scale [d] in plain jnp: statistics in float32, output in x.dtype."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(x32.dtype)).astype(x.dtype)


def layer_norm_reference(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x [..., d] - mean) / sqrt(var + eps) * scale [d] + bias [d] in plain jnp: statistics in float32, output in
    x.dtype."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(x32.dtype) + bias.astype(x32.dtype)).astype(x.dtype)
