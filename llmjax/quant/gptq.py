"""GPTQ (Frantar et al. 2022): quantize a linear layer column by column, compensating each column's
rounding error on the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction error ||X W - X Q||^2 (H = 2 X^T X from calibration activations X).

- Lazy batch updates: the error is propagated within a block of `block_size` columns at once and to
  the rest of the matrix once per block (a matmul), as in the paper's Algorithm 1.
- Act-order: columns are processed by decreasing Hessian diagonal (the most sensitive first). With
  groups, the group scales / zero points are then fixed from the unquantized weights beforehand
  ("static groups"), so the stored layout is the plain per-group one and no column index is needed.
- Damping: `damp` x mean(diag H) is added to the diagonal before inverting.

The per-layer core runs on the host in float64 NumPy (sequential over columns; the matrices are at most
a few thousand wide). `gptq_quantize_params` walks the model block by block: each block's linear inputs
are captured with the blocks before it already quantized, and within a block q / k / v, then o, then
up / gate, then down are quantized in order (each seeing the quantized outputs of the previous ones).
The result has the same `QuantizedMatrix` layout as round-to-nearest (llmjax.quant.formats).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.model.attention import attention_layer
from llmjax.model.layers import mlp, norm
from llmjax.quant.formats import (
    BITS,
    QuantizationError,
    QuantizedMatrix,
    pack_codes,
    resolve_group_size,
)
from llmjax.quant.model import DEFAULT_TARGETS, _get, _set, match_targets

GPTQ_FORMATS = ("int8", "int4", "int3")


def hessian(inputs: np.ndarray) -> np.ndarray:
    """H = 2 / n X^T X for inputs X [n, in] (float64)."""
    x = np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1])
    return 2.0 / x.shape[0] * x.T @ x


def _params(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) per row of w [rows, cols], min-max (asymmetric) or absmax (symmetric); scale as stored (fp16)."""
    if symmetric:
        scale = np.abs(w).max(axis=1) / (2 ** (bits - 1) - 1)
        zero = np.full_like(scale, 2 ** (bits - 1))
    else:
        low, high = np.minimum(w.min(axis=1), 0), np.maximum(w.max(axis=1), 0)
        scale = (high - low) / (2**bits - 1)
        zero = np.round(-low / np.where(scale == 0, 1, scale))
    scale = scale.astype(np.float16).astype(np.float64)
    return scale, zero


def _quantize_column(w, scale, zero, bits):
    code = np.clip(np.round(w / np.where(scale == 0, 1, scale)) + zero, 0, 2**bits - 1)
    return code, (code - zero) * scale


def gptq_matrix(weight: np.ndarray, h: np.ndarray, fmt: str = "int4", group_size: int | None = 128, *,
                act_order: bool = True, damp: float = 0.01, block_size: int = 128, symmetric: bool | None = None,
                shape: tuple | None = None, in_dims: int = 1) -> QuantizedMatrix:
    """GPTQ one matrix weight [in, out] with the Hessian h [in, in] of its inputs -> QuantizedMatrix."""
    if fmt not in GPTQ_FORMATS:
        raise QuantizationError(f"GPTQ quantizes to {', '.join(GPTQ_FORMATS)}, not {fmt!r}")
    bits = BITS[fmt]
    symmetric = (bits == 8) if symmetric is None else symmetric
    w = np.asarray(weight, np.float64).T.copy()  # [rows = out, cols = in], the paper's layout
    rows, cols = w.shape
    group = resolve_group_size(fmt, cols, group_size)
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    groups = cols // group
    scales, zeros = np.zeros((groups, rows)), np.zeros((groups, rows))
    static = act_order or group == cols  # group parameters fixed up front from the unquantized weights
    if static:
        for g in range(groups):
            scales[g], zeros[g] = _params(w[:, g * group:(g + 1) * group], bits, symmetric)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper U with H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise QuantizationError("the calibration Hessian is not positive definite even after damping; use more "
                                "(and more varied) calibration tokens or a larger damp") from None
    codes = np.zeros((rows, cols))
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = w[:, start:stop].copy()
        errors = np.zeros_like(block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = perm[start + i]  # index in the original order
            g = column // group
            if not static and column % group == 0:  # first column of a group (in order): fix its parameters now
                ahead = np.concatenate([block[:, i:], w[:, stop:]], axis=1)[:, :group]
                scales[g], zeros[g] = _params(ahead, bits, symmetric)
            code, value = _quantize_column(block[:, i], scales[g], zeros[g], bits)
            codes[:, start + i] = code
            error = (block[:, i] - value) / hinv_block[i, i]
            block[:, i:] -= np.outer(error, hinv_block[i, i:])
            errors[:, i] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    codes = codes[:, np.argsort(perm)].T.astype(np.uint8)  # [in, out] in the original order
    codes = pack_codes(jnp.asarray(codes), bits)
    return QuantizedMatrix(jnp.asarray(codes), scales=jnp.asarray(scales, jnp.float16),
                           zeros=None if symmetric else jnp.asarray(zeros, jnp.uint8), format=fmt,
                           group_size=group, shape=shape or tuple(weight.shape), in_dims=in_dims)


def check_calibration(num_tokens: int, cfg: ModelConfig, names) -> None:
    """GPTQ's Hessian of a layer with `in` inputs has rank <= the calibration tokens: ask for at least `in`."""
    widest = max(cfg.d_ff if "mlp/down" in n else cfg.q_size if "attn/o" in n else cfg.d_model for n in names)
    if num_tokens < widest:
        raise QuantizationError(
            f"GPTQ needs at least {widest} calibration tokens (the widest quantized layer's input dimension) to "
            f"estimate each layer's Hessian; got {num_tokens}. Give more calibration sequences (the paper uses "
            f"128 x 2048 tokens) or quantize with round-to-nearest")


def gptq_quantize_params(params: dict, cfg: ModelConfig, calibration_tokens, fmt: str = "int4",
                         group_size: int | None = 128, *, act_order: bool = True, damp: float = 0.01,
                         block_size: int = 128, targets=DEFAULT_TARGETS, progress=None) -> dict:
    """Params with the targeted block kernels GPTQ-quantized, calibrated on tokens [batch, seq].
    progress: called with (layer, num_layers) after each block."""
    tokens = jnp.asarray(calibration_tokens)
    chosen = match_targets(cfg, targets)
    check_calibration(int(tokens.size), cfg, chosen)
    for name, in_dims in chosen.items():  # the group size must fit every layer before any work starts
        resolve_group_size(fmt, int(np.prod(_get(params, name).shape[1:1 + in_dims])), group_size)
    dtype = jnp.float32
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    top = jax.tree.map(lambda a: a.astype(dtype), {k: v for k, v in params.items() if k != "blocks"})
    x = jnp.take(top["embed"]["token"], tokens, axis=0)
    if cfg.positions == "learned":
        x = x + jnp.take(top["embed"]["position"], positions, axis=0)
    run_cfg = cfg.replace(compute_dtype="float32", attention_impl="xla")  # cuDNN's fused attention takes no float32
    attention = jax.jit(lambda p, h: attention_layer(p, h, positions, run_cfg)[0])
    mlp_fn = jax.jit(lambda p, h: mlp(p, h, run_cfg))
    quantized_layers = []

    for layer_index in range(cfg.num_layers):
        layer = jax.tree.map(lambda a: a[layer_index].astype(dtype), params["blocks"])
        done: dict[str, QuantizedMatrix] = {}

        def quantize_part(part: str, inputs):
            nonlocal layer
            name = f"blocks/{part}/kernel"
            if name not in chosen:
                return
            w = _get(layer, part + "/kernel")
            in_dims = chosen[name]
            matrix = np.asarray(w).reshape(int(np.prod(w.shape[:in_dims])), -1)
            qm = gptq_matrix(matrix, hessian(np.asarray(inputs)), fmt, group_size, act_order=act_order, damp=damp,
                             block_size=block_size, shape=tuple(w.shape), in_dims=in_dims)
            done[name] = qm
            layer = _set(layer, part + "/kernel", qm.dequantize(dtype))

        h_attn = norm(layer["attn_norm"], x, run_cfg)
        for part in ("attn/q", "attn/k", "attn/v"):
            quantize_part(part, h_attn)
        identity_o = {"kernel": jnp.eye(cfg.q_size, dtype=dtype).reshape(cfg.num_heads, cfg.head_dim, cfg.q_size)}
        quantize_part("attn/o", attention({**layer["attn"], "o": identity_o}, h_attn))
        x = x + attention(layer["attn"], h_attn)
        h_mlp = norm(layer["mlp_norm"], x, run_cfg)
        for part in ("mlp/up", "mlp/gate"):
            if part in ("mlp/up",) or cfg.activation == "swiglu":
                quantize_part(part, h_mlp)
        identity_down = {"kernel": jnp.eye(cfg.d_ff, dtype=dtype)}
        quantize_part("mlp/down", mlp_fn({**layer["mlp"], "down": identity_down}, h_mlp))
        x = x + mlp_fn(layer["mlp"], h_mlp)
        quantized_layers.append(done)
        if progress is not None:
            progress(layer_index + 1, cfg.num_layers)

    for name in chosen:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[layer[name] for layer in quantized_layers])
        params = _set(params, name, stacked)
    return params
