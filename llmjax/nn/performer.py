"""Performer / FAVOR+ linear attention (Choromanski et al. 2021, "Rethinking Attention with Performers").

softmax(q k^T / sqrt(d)) v is approximated with positive random features phi so that
exp(q.k / sqrt(d)) = E[phi(q) . phi(k)]:

    phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(M),  i = 1..M,  x = q * d**-0.25 (likewise k)

with the rows w_i of an [M, d] projection drawn as blocks of orthogonal Gaussian rows (`orthogonal_random_features`).
Attention then costs O(n M d) instead of O(n^2 d):

    non-causal: out_i = phi(q_i) . (sum_j phi(k_j) v_j^T) / phi(q_i) . (sum_j phi(k_j))
    causal:     the same with prefix sums over j <= i, computed chunk by chunk: each chunk's sums S = sum phi(k) v^T
                [M, d_v] and z = sum phi(k) [M], a cumulative sum of them over the chunks (the keys of the chunks
                before), and inside a chunk a masked quadratic product.

Stabilizers: before the exp a query's features subtract their own row max, the keys' one max over all keys and
features (per batch and kv head). Each is a constant factor of the numerator and the denominator of the same ratio
(the query's for its row, the keys' for every row), so it cancels exactly; no epsilon is added inside the features,
which would break that cancellation.

Feature redraw: the projection is an argument. Redrawing the features (as the paper does every few steps in
training) is drawing a new projection with a new key: `performer_projection(features, head_dim, new_key)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.nn._checks import check_float, check_ndim, shape_of

FUNCTION = "performer_attention"
DEFAULT_CHUNK = 128


def orthogonal_random_features(key: jax.Array, num_features: int, head_dim: int, dtype=jnp.float32) -> jax.Array:
    """The FAVOR+ projection [num_features, head_dim]: ceil(M / d) blocks of d orthonormal rows (the Q of a QR of a
    d x d Gaussian matrix, signs fixed by R's diagonal so each block is Haar-distributed), the last block cut to the
    rows needed, each row then scaled by an independent chi_d norm (the norm of a d-dimensional standard Gaussian).

    Each row is marginally a standard Gaussian vector (uniform direction times a chi_d length), so every feature is an
    unbiased estimator of the softmax kernel; rows within a block are exactly orthogonal, which lowers the variance.
    """
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"orthogonal_random_features: num_features={num_features!r} must be a positive integer")
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"orthogonal_random_features: head_dim={head_dim!r} must be a positive integer")
    num_blocks = -(-num_features // head_dim)
    block_key, norm_key = jax.random.split(key)
    gaussian = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), dtype)  # [blocks, d, d]
    q, r = jnp.linalg.qr(gaussian)  # q's columns orthonormal
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]  # Haar: column j times sign(r_jj)
    rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * head_dim, head_dim)[:num_features]  # [M, d] unit rows
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), dtype), axis=-1)  # [M] ~ chi_d
    return rows * norms[:, None]


def performer_projection(cfg_or_features, head_dim: int, key: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The [M, head_dim] projection of `performer_attention`, M = cfg.performer_features (a ModelConfig, or anything
    with that field) or the integer given. Redrawing the features = calling this again with a new key."""
    features = getattr(cfg_or_features, "performer_features", cfg_or_features)
    return orthogonal_random_features(key, features, head_dim, dtype)


@functools.lru_cache(maxsize=None)
def fixed_projection(num_features: int, head_dim: int, seed: int = 0) -> np.ndarray:
    """performer_projection(num_features, head_dim, jax.random.key(seed)) as a float32 NumPy constant, drawn once
    per (num_features, head_dim, seed) even when called while tracing (the model's attention_impl="performer")."""
    with jax.ensure_compile_time_eval():
        projection = performer_projection(num_features, head_dim, jax.random.key(seed), jnp.float32)
    return np.asarray(projection)


def softmax_kernel_features(x: jax.Array, projection: jax.Array, *, stabilize: str | None = None) -> jax.Array:
    """Positive random features phi(x) [..., M] of x [..., d] (already scaled by d**-0.25):
    exp(projection @ x - |x|^2 / 2 - c) / sqrt(M), computed in x's dtype.

    stabilize: None (c = 0: the unbiased estimator, E[phi(x) . phi(y)] = exp(x . y)); "row" (c = the row's max over
    the M features); "keys" (x [batch, seq, heads, d], c = one max over seq and features per batch and head). c is
    held constant for gradients: it cancels in the attention ratio, so the function has no derivative through it.
    """
    logits = jnp.einsum("...d,md->...m", x, projection.astype(x.dtype)) - 0.5 * jnp.sum(x * x, -1, keepdims=True)
    if stabilize == "row":
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    elif stabilize == "keys":
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=(1, -1), keepdims=True))
    elif stabilize is not None:
        raise ValueError(f"softmax_kernel_features: stabilize={stabilize!r}: expected None, 'row' or 'keys'")
    return jnp.exp(logits) * projection.shape[0] ** -0.5


def _check_inputs(q, k, v, projection, causal, chunk) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("projection", projection)):
        check_float(FUNCTION, name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_ndim(FUNCTION, name, x, (4,), "[batch, seq, heads, head_dim]")
    check_ndim(FUNCTION, "projection", projection, (2,), "[num_features, head_dim]")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{FUNCTION}: k {shape_of(k)} and v {shape_of(v)} must agree in batch, kv_len and kv_heads")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{FUNCTION}: q {shape_of(q)} and k {shape_of(k)} must agree in batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{FUNCTION}: q has {q.shape[2]} heads, not a multiple of k's {k.shape[2]} kv heads")
    if projection.shape[1] != q.shape[3]:
        raise ValueError(f"{FUNCTION}: projection {shape_of(projection)} must be [num_features, head_dim="
                         f"{q.shape[3]}] (performer_projection(features, head_dim, key))")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{FUNCTION}: chunk={chunk!r} must be a positive integer")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"{FUNCTION}: causal with q_len={q.shape[1]} > kv_len={k.shape[1]}: queries are aligned to "
                         f"the end of the keys, so the first ones would see no key")


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator [..., d_v] / denominator [...]; a row whose features all underflowed (or a padded one) gives 0."""
    return numerator / jnp.maximum(denominator, jnp.finfo(denominator.dtype).tiny)[..., None]


def _causal_chunked(phi_q, phi_k, v, state, chunk):
    """Prefix-sum attention of aligned queries and keys: phi_q [b, n, kv, g, M], phi_k [b, n, kv, M],
    v [b, n, kv, dv], state (S [b, kv, M, dv], z [b, kv, M]) of the keys before -> (numerator [b, n, kv, g, dv],
    denominator [b, n, kv, g]).

    Nothing runs in sequence: every chunk's sums phi(k)^T v come from one batched matmul, the sums of the chunks
    before each chunk from one (exclusive) cumulative sum over the chunk axis, and the keys inside a chunk from a
    masked [chunk, chunk] product, so the GPU sees a few large operations instead of a scan of n / chunk small
    ones. Memory: one [M, dv] state per chunk (n / chunk of them)."""
    batch, n = phi_q.shape[:2]
    padded = -(-n // chunk) * chunk
    pad = [(0, 0), (0, padded - n)]
    phi_q = jnp.pad(phi_q, pad + [(0, 0)] * 3)  # padded queries and keys have zero features: no contribution
    phi_k, v = jnp.pad(phi_k, pad + [(0, 0)] * 2), jnp.pad(v, pad + [(0, 0)] * 2)

    def chunks(x):  # [b, padded, ...] -> [b, num_chunks, chunk, ...]
        return x.reshape(batch, padded // chunk, chunk, *x.shape[2:])

    pq, pk, vc = chunks(phi_q), chunks(phi_k), chunks(v)  # [b, nc, c, kv, g, M], [b, nc, c, kv, M], [b, nc, c, kv, dv]
    chunk_s = jnp.einsum("bnekm,bnekv->bnkmv", pk, vc)  # [b, nc, kv, M, dv]: each chunk's own sums
    chunk_z = pk.sum(2)  # [b, nc, kv, M]

    def before(per_chunk, initial):  # sums of the chunks before each one (exclusive), plus the keys before them all
        running = jnp.cumsum(per_chunk[:, :-1], axis=1)
        return jnp.concatenate([jnp.zeros_like(per_chunk[:, :1]), running], axis=1) + initial[:, None]

    s, z = before(chunk_s, state[0]), before(chunk_z, state[1])  # [b, nc, kv, M, dv], [b, nc, kv, M]
    lower = jnp.tril(jnp.ones((chunk, chunk), jnp.bool_))  # [c, e]: key e of the chunk at or before query c
    scores = jnp.where(lower, jnp.einsum("bnckgm,bnekm->bnkgce", pq, pk), 0)  # [b, nc, kv, g, c, e]
    numerator = jnp.einsum("bnckgm,bnkmv->bnckgv", pq, s) + jnp.einsum("bnkgce,bnekv->bnckgv", scores, vc)
    denominator = jnp.einsum("bnckgm,bnkm->bnckg", pq, z) + jnp.moveaxis(scores.sum(-1), -1, 2)
    return (numerator.reshape(batch, padded, *numerator.shape[3:])[:, :n],
            denominator.reshape(batch, padded, *denominator.shape[3:])[:, :n])


def performer_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    projection: jax.Array,
    *,
    causal: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
    """FAVOR+ approximation of softmax(q k^T / sqrt(head_dim)) v in O(seq * M * head_dim).

    q [batch, q_len, heads, head_dim]; k [batch, kv_len, kv_heads, head_dim]; v [batch, kv_len, kv_heads, v_dim];
    query head h reads kv head h // (heads // kv_heads) (grouped-query attention, K/V not repeated).
    projection [M, head_dim]: `performer_projection` / `orthogonal_random_features` (M random features).
    causal: query i sees keys j <= i + kv_len - q_len (queries aligned to the end of the keys, as the exact
        attention of llmjax.kernels.flash_attention.reference): the keys before the queries enter as the prefix
        sums' initial state, the rest as prefix sums over chunks of `chunk` tokens (a length not divisible by `chunk`
        is padded with zero-feature tokens, which contribute nothing, and cut back).
    Features and sums run in float32 (float64 for float64 inputs) whatever the input dtype; returns
    [batch, q_len, heads, v_dim] in q's dtype.
    """
    _check_inputs(q, k, v, projection, causal, chunk)
    out_dtype = q.dtype
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    compute = jnp.promote_types(q.dtype, jnp.float32)
    scale = head_dim**-0.25  # q.k / sqrt(d) = (q d^-1/4) . (k d^-1/4)
    projection = projection.astype(compute)
    q = q.astype(compute).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)  # [b, s, kv, g, d]
    phi_q = softmax_kernel_features(q * scale, projection, stabilize="row")  # [b, s, kv, g, M]
    phi_k = softmax_kernel_features(k.astype(compute) * scale, projection, stabilize="keys")  # [b, t, kv, M]
    v = v.astype(compute)  # [b, t, kv, dv]

    if not causal:
        s = jnp.einsum("btkm,btkv->bkmv", phi_k, v)  # [b, kv, M, dv]
        z = phi_k.sum(1)  # [b, kv, M]
        numerator = jnp.einsum("bskgm,bkmv->bskgv", phi_q, s)
        denominator = jnp.einsum("bskgm,bkm->bskg", phi_q, z)
    else:
        before = kv_len - q_len  # keys every query sees
        state = (jnp.einsum("btkm,btkv->bkmv", phi_k[:, :before], v[:, :before]), phi_k[:, :before].sum(1))
        numerator, denominator = _causal_chunked(phi_q, phi_k[:, before:], v[:, before:], state, min(chunk, q_len))
    out = _ratio(numerator, denominator)  # [b, s, kv, g, dv]
    return out.reshape(batch, q_len, heads, v.shape[-1]).astype(out_dtype)


def performer_attention_dense(q: jax.Array, k: jax.Array, v: jax.Array, projection: jax.Array, *,
                              causal: bool = False) -> jax.Array:
    """The same estimator in O(seq^2): the feature scores phi(q) . phi(k) [b, kv, g, s, t] materialized, masked
    (queries aligned to the end of the keys) and normalized per row. The readable reference `performer_attention`
    is tested against; same arguments, same dtypes."""
    _check_inputs(q, k, v, projection, causal, DEFAULT_CHUNK)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    compute = jnp.promote_types(q.dtype, jnp.float32)
    projection = projection.astype(compute)
    qg = q.astype(compute).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    phi_q = softmax_kernel_features(qg * head_dim**-0.25, projection, stabilize="row")
    phi_k = softmax_kernel_features(k.astype(compute) * head_dim**-0.25, projection, stabilize="keys")
    scores = jnp.einsum("bskgm,btkm->bkgst", phi_q, phi_k)  # [b, kv, g, s, t]
    if causal:
        visible = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + (kv_len - q_len)  # [s, t]
        scores = jnp.where(visible, scores, 0)
    numerator = jnp.einsum("bkgst,btkv->bskgv", scores, v.astype(compute))  # [b, s, kv, g, dv]
    out = _ratio(numerator, jnp.moveaxis(scores.sum(-1), -1, 1))  # denominator [b, s, kv, g]
    return out.reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype)
