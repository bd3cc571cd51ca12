"""Input checks for flash attention: one clear ValueError per problem, naming the argument, what was
expected and what was given, raised before any kernel is traced."""

from __future__ import annotations

import numbers

import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 16
MOSAIC_HEAD_DIMS = (64, 128)  # what the Hopper kernels (mosaic_gpu.py, mosaic_gpu_backward.py) take
MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(_shape(x)) != 4:
            layout = "[batch, q_len, heads, head_dim]" if name == "q" else "[batch, kv_len, kv_heads, head_dim]"
            raise ValueError(f"flash_attention: {name} must be 4-D {layout}, got shape {_shape(x)}")
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1:
        raise ValueError(f"flash_attention: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                         f"v {v.dtype}")
    if jnp.dtype(q.dtype) not in {jnp.dtype(d) for d in SUPPORTED_DTYPES}:
        raise ValueError(f"flash_attention: dtype must be bfloat16, float16 or float32, got {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape [batch, kv_len, kv_heads, "
                         f"head_dim], got k {k.shape} and v {v.shape}")
    batch, _, heads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"flash_attention: k batch must equal q batch {batch}, got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"flash_attention: k head_dim must equal q head_dim {head_dim}, got {k.shape[3]}")
    if head_dim % HEAD_DIM_MULTIPLE or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim must be a multiple of {HEAD_DIM_MULTIPLE} in "
                         f"[{HEAD_DIM_MULTIPLE}, {MAX_HEAD_DIM}], got {head_dim}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"flash_attention: q heads must be a multiple of k/v kv_heads, got heads {heads} "
                         f"and kv_heads {kv_heads}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"flash_attention: q_len and kv_len must be positive, got q_len {q.shape[1]} and "
                         f"kv_len {k.shape[1]}")


def _check_segment_ids(name: str, ids, expected: tuple[int, int]) -> None:
    if _shape(ids) != expected:
        raise ValueError(f"flash_attention: {name} must have shape [batch, len] = {expected}, got {_shape(ids)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"flash_attention: {name} must be an integer array, got {ids.dtype}")


def validate_attention_inputs(q, k, v, *, causal=True, sliding_window=None, q_segment_ids=None,
                              kv_segment_ids=None, logit_softcap=None) -> None:
    """Raise ValueError for anything the kernels do not accept (shapes, dtypes, masking arguments)."""
    _check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise ValueError(f"flash_attention: causal must be a bool, got {causal!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral)
                                       or sliding_window < 1):
        raise ValueError(f"flash_attention: sliding_window must be None or an int >= 1 (keys back, the query's "
                         f"own included), got {sliding_window!r}")
    if logit_softcap is not None and (isinstance(logit_softcap, bool)
                                      or not isinstance(logit_softcap, numbers.Real) or not logit_softcap > 0):
        raise ValueError(f"flash_attention: logit_softcap must be None or a number > 0, got {logit_softcap!r}")
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if kv_segment_ids is not None and q_segment_ids is None:
        raise ValueError("flash_attention: kv_segment_ids needs q_segment_ids too (got only kv_segment_ids)")
    if q_segment_ids is not None:
        _check_segment_ids("q_segment_ids", q_segment_ids, (batch, q_len))
        if kv_segment_ids is None and kv_len != q_len:
            raise ValueError(f"flash_attention: kv_segment_ids [batch, kv_len] = {(batch, kv_len)} is required "
                             f"when q_len ({q_len}) differs from kv_len ({kv_len}); got only q_segment_ids")
        if kv_segment_ids is not None:
            _check_segment_ids("kv_segment_ids", kv_segment_ids, (batch, kv_len))


def mosaic_unsupported_operands(q, k, v, q_segment_ids, kv_segment_ids, what: str) -> str | None:
    """Why the Hopper (Mosaic GPU) forward or backward (`what`) cannot take these operands, or None: the checks
    both share (layouts, dtypes, head dims, GQA, no segment ids), here so neither kernel imports the other."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return "q, k, v must be [batch, seq, heads, head_dim]"
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape != (batch, kv_len, kv_heads, head_dim) or v.shape != k.shape:
        return f"k {k.shape} and v {v.shape} must both be [batch, kv_len, kv_heads, {head_dim}]"
    if not (jnp.dtype(q.dtype) == jnp.dtype(k.dtype) == jnp.dtype(v.dtype)) or jnp.dtype(q.dtype) not in MOSAIC_DTYPES:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} not supported (bfloat16 or float16, all the same)"
    if head_dim not in MOSAIC_HEAD_DIMS:
        return f"head_dim {head_dim} not supported by the Hopper {what} (only {MOSAIC_HEAD_DIMS})"
    if heads % kv_heads:
        return f"heads {heads} is not a multiple of kv_heads {kv_heads}"
    if q_segment_ids is not None or kv_segment_ids is not None:
        return f"segment ids not supported by the Hopper {what}"
    return None
