"""Product quantization (Jegou et al. 2011) with ScaNN's anisotropic, score-aware loss (Guo et al. 2020).

A vector of `dim` values is cut into m sub-vectors of dim / m values; each sub-vector is replaced by the index of
the nearest of 2^bits centroids of its subspace, so a vector costs m bytes (bits <= 8, codes uint8):

    codebooks = train_pq(residuals, m=16, bits=8, key=key)                      # [m, K, dim / m]
    codes = encode(residuals, codebooks)                                        # [n, m] uint8
    approx = decode(codes, codebooks)                                           # [n, dim]
    tables = distance_tables(queries, codebooks, "ip")                          # [q, m, K]
    scores = lookup_scores(tables, codes[None])                                 # [q, n]: sum of table entries

Anisotropic loss (Guo et al., "Accelerating Large-Scale Inference with Anisotropic Vector Quantization", ICML 2020).
For maximum inner product search what matters is the error of <q, x> for the queries q that score x highly, and
the paper shows (Theorem 3.2) that for q uniform on the unit sphere, weighting each query by w(<q, x>), the
expected weighted error is  h_par ||r_par||^2 + h_perp ||r_perp||^2  with r = x - x~ the residual, r_par its
component along x and r_perp the rest. For the weight w(t) = 1[t >= T] (Theorem 3.3, and its limit in large d,
Theorem 3.4):  eta = h_par / h_perp = (d - 1) T^2 / (||x||^2 - T^2)  (`anisotropic_eta`). With T > 0 the error along
x costs more than the error across it (eta > 1), because it shifts exactly the high inner products that decide
the top results. Here the loss is divided by h_perp (one scale per point):

    loss(x, x~) = eta ||r_par||^2 + ||r_perp||^2 = ||r||^2 + (eta - 1) (r . x)^2 / ||x||^2

and eta = 1 is the ordinary reconstruction loss (plain PQ, k-means codebooks).

Training (the paper's Section 4) alternates
- assignment: per point, the code minimizing the loss. The parallel part (r . x)^2 couples the subspaces, so it is
  coordinate descent: one subspace at a time picks its best centroid with the others fixed (a few rounds);
- codebook update: with the codes fixed the loss is quadratic in the centroids: per subspace (the others fixed)
  and per centroid j a dim/m x dim/m system  sum_i (I + (eta_i - 1) u_i u_i^T) c_j = sum_i (z_i + (eta_i - 1)
  (a_i + u_i . z_i) u_i)  over the points i coded j (u_i: unit direction of x_i restricted to the subspace, a_i: the
  parallel residual of the other subspaces), solved exactly; the paper's weighted least squares, one block at a
  time (block coordinate descent on the same objective, so the loss never rises).
Both start from plain PQ (k-means per subspace), as ScaNN does.

The quantized thing may be a residual: in IVF-PQ one codes z = x - c (c the list's centroid), while the loss is
that of the datapoint x (ScaNN): the direction is x / ||x||, not z / ||z||. So training and encoding take the
targets z, the unit directions u of the datapoints and each point's eta separately.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.retrieval.kmeans import kmeans

# ---- the loss -------------------------------------------------------------------------------------------------


def anisotropic_eta(squared_norms, threshold: float, dim: int, max_ratio: float = 0.9):
    """eta = h_par / h_perp = (d - 1) T^2 / (||x||^2 - T^2) (Guo et al. 2020, Theorem 3.4) for each point.
    T^2 / ||x||^2 is capped at max_ratio: a point no unit query can score above T carries no weight at all in the
    paper's model (eta infinite); the cap keeps such points finite (their parallel error still costs the most)."""
    ratio = jnp.minimum(threshold ** 2 / jnp.maximum(squared_norms, 1e-30), max_ratio)
    return (dim - 1) * ratio / (1.0 - ratio)


def anisotropic_loss(x, x_hat, eta):
    """loss [n] = eta ||r_par||^2 + ||r_perp||^2 with r = x - x_hat, r_par = (r . x) x / ||x||^2.
    x, x_hat [n, dim]; eta [n] or a scalar. (A zero x has no direction: its loss is ||r||^2.)"""
    residual = x - x_hat
    squared_norms = jnp.sum(x * x, axis=-1)
    parallel_sq = jnp.sum(residual * x, axis=-1) ** 2 / jnp.where(squared_norms > 0, squared_norms, 1.0)
    return jnp.sum(residual * residual, axis=-1) + (eta - 1.0) * parallel_sq


def anisotropic_loss_grad(x, x_hat, eta):
    """d loss / d x_hat [n, dim] = -2 (r_perp + eta r_par) = -2 (r + (eta - 1) r_par): the gradient a codebook
    update follows (and the closed-form update zeroes)."""
    residual = x - x_hat
    squared_norms = jnp.sum(x * x, axis=-1, keepdims=True)
    parallel = jnp.sum(residual * x, axis=-1, keepdims=True) * x / jnp.where(squared_norms > 0, squared_norms, 1.0)
    return -2.0 * (residual + (jnp.asarray(eta)[..., None] - 1.0) * parallel)


# ---- encode / decode ------------------------------------------------------------------------------------------


def split(vectors, m: int):
    """[n, dim] -> [n, m, dim / m]."""
    return vectors.reshape(*vectors.shape[:-1], m, vectors.shape[-1] // m)


def decode(codes, codebooks):
    """codes [..., m] (uint8) -> vectors [..., dim]: the concatenation of each subspace's chosen centroid."""
    m, _, sub = codebooks.shape
    parts = codebooks[jnp.arange(m), codes.astype(jnp.int32)]  # [..., m, sub]
    return parts.reshape(*codes.shape[:-1], m * sub)


def _chunked_map(fn, arrays, batch: int):
    """fn over chunks of `batch` rows of every array in `arrays` (padded), concatenated: bounded memory."""
    n = arrays[0].shape[0]
    batch = max(1, min(batch, n))
    padded = -(-n // batch) * batch
    chunks = [jnp.pad(a, [(0, padded - n)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, batch, *a.shape[1:])
              for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), chunks)
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def subspace_dots(vectors, codebooks):
    """Each sub-vector against every centroid of its subspace: vectors [n, dim], codebooks [m, K, sub] ->
    [m, n, K] (subspace-major: a batched matmul with m as the batch, the layout XLA runs fastest on CPU too)."""
    m = codebooks.shape[0]
    parts = jnp.moveaxis(split(vectors, m), 1, 0)  # [m, n, sub]
    return jnp.einsum("mns,mks->mnk", parts, codebooks, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("batch",))
def encode(vectors, codebooks, *, batch: int = 4096):
    """Nearest centroid per subspace (the reconstruction loss): codes [n, m] uint8 of vectors [n, dim]."""
    centroid_norms = jnp.sum(codebooks * codebooks, axis=-1)  # [m, K]

    def one(chunk):  # [batch, dim]
        scores = 2.0 * subspace_dots(chunk, codebooks) - centroid_norms[:, None, :]  # [m, batch, K]
        return jnp.argmax(scores, axis=-1).astype(jnp.uint8).T  # [batch, m]

    return _chunked_map(one, [vectors], batch)


def _anisotropic_codes(targets, directions, eta, codebooks, codes, rounds: int):
    """Coordinate descent on the anisotropic loss for one chunk. targets z [n, dim], directions u [n, dim] (unit),
    eta [n], codes [n, m] (the start, e.g. plain PQ) -> codes [n, m]."""
    m = codebooks.shape[0]
    z, u = jnp.moveaxis(split(targets, m), 1, 0), jnp.moveaxis(split(directions, m), 1, 0)  # [m, n, sub]
    # if subspace s picks centroid j, its residual e = z_s - c_j has
    errors = (jnp.sum(z * z, -1)[..., None] - 2.0 * subspace_dots(targets, codebooks)
              + jnp.sum(codebooks ** 2, -1)[:, None, :])  # ||e||^2  [m, n, K]
    parallels = jnp.sum(u * z, -1)[..., None] - subspace_dots(directions, codebooks)  # u_s . e  [m, n, K]
    weight = (eta - 1.0)[:, None]  # [n, 1]
    codes = codes.astype(jnp.int32).T  # [m, n]
    pick = lambda table, code: jnp.take_along_axis(table, code[:, None], -1)[:, 0]  # noqa: E731  [n, K], [n] -> [n]
    total = jnp.sum(jax.vmap(pick)(parallels, codes), 0)  # [n] the parallel residual of the whole code

    def visit(step, carry):
        codes, total = carry
        s = step % m
        others = total - pick(parallels[s], codes[s])  # [n]: the parallel residual of the other subspaces
        cost = errors[s] + weight * (others[:, None] + parallels[s]) ** 2  # [n, K]
        best = jnp.argmin(cost, -1).astype(jnp.int32)
        return codes.at[s].set(best), others + pick(parallels[s], best)

    codes, _ = jax.lax.fori_loop(0, rounds * m, visit, (codes, total))
    return codes.T.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("rounds", "batch"))
def encode_anisotropic(targets, directions, eta, codebooks, *, rounds: int = 3, batch: int = 1024):
    """Codes [n, m] uint8 minimizing the anisotropic loss of targets [n, dim] (z: the vector or its residual)
    along directions [n, dim] (unit: x / ||x||) with eta [n]: plain PQ codes, then `rounds` sweeps of coordinate
    descent over the subspaces."""
    eta = jnp.broadcast_to(jnp.asarray(eta, jnp.float32), targets.shape[:1])

    def one(z, u, e):
        return _anisotropic_codes(z, u, e, codebooks, encode(z, codebooks), rounds)

    return _chunked_map(one, [targets, directions, eta], batch)


# ---- training -------------------------------------------------------------------------------------------------


@jax.jit
def update_codebooks(targets, directions, eta, codes, codebooks):
    """The closed-form codebook update: for each subspace in turn (the others fixed, Gauss-Seidel) and each centroid,
    the minimizer of the summed anisotropic loss over the points coded to it (see the module docstring). A centroid
    no point uses keeps its value (a small ridge towards the old value keeps every system regular)."""
    m, num_centroids, sub = codebooks.shape
    z, u = split(targets, m), split(directions, m)  # [n, m, sub]
    codes = codes.astype(jnp.int32)
    weight = eta - 1.0  # [n]
    ridge = 1e-4

    def parallel_of(codebooks):  # u_s . (z_s - c_code) for every subspace [n, m]
        return jnp.sum(u * (z - codebooks[jnp.arange(m), codes]), -1)

    def subspace(s, codebooks):
        parallels = parallel_of(codebooks)
        others = jnp.sum(parallels, -1) - parallels[:, s]  # [n]
        z_s, u_s, code = z[:, s], u[:, s], codes[:, s]  # [n, sub], [n, sub], [n]
        outer = weight[:, None, None] * u_s[:, :, None] * u_s[:, None, :]  # [n, sub, sub]
        lhs = jax.ops.segment_sum(outer, code, num_centroids)  # [K, sub, sub]
        counts = jax.ops.segment_sum(jnp.ones_like(weight), code, num_centroids)  # [K]
        lhs = lhs + (counts + ridge)[:, None, None] * jnp.eye(sub)
        rhs_each = z_s + (weight * (others + jnp.sum(u_s * z_s, -1)))[:, None] * u_s  # [n, sub]
        rhs = jax.ops.segment_sum(rhs_each, code, num_centroids) + ridge * codebooks[s]  # [K, sub]
        return codebooks.at[s].set(jnp.linalg.solve(lhs, rhs[..., None])[..., 0])

    return jax.lax.fori_loop(0, m, subspace, codebooks)


def train_pq(targets, m: int, bits: int, key, *, directions=None, eta=None, iters: int = 20,
             anisotropic_iters: int = 6, rounds: int = 3):
    """Codebooks [m, 2^bits, dim / m] float32 for targets [n, dim] (n >= 2^bits: the caller checks).

    Plain PQ: k-means in every subspace (vmapped: one program). With directions [n, dim] (unit) and eta [n] (or a
    scalar), then `anisotropic_iters` alternations of anisotropic assignment (coordinate descent, `rounds` sweeps)
    and the closed-form codebook update."""
    targets = jnp.asarray(targets, jnp.float32)
    num_centroids = 2 ** bits
    sub_points = jnp.moveaxis(split(targets, m), 1, 0)  # [m, n, sub]
    keys = jax.random.split(key, m)
    codebooks, _ = jax.vmap(lambda p, k: kmeans(p, num_centroids, k, iters=iters))(sub_points, keys)
    if directions is None or eta is None:
        return codebooks
    eta = jnp.broadcast_to(jnp.asarray(eta, jnp.float32), targets.shape[:1])
    directions = jnp.asarray(directions, jnp.float32)
    for _ in range(anisotropic_iters):
        codes = encode_anisotropic(targets, directions, eta, codebooks, rounds=rounds)
        codebooks = update_codebooks(targets, directions, eta, codes, codebooks)
    return codebooks


# ---- asymmetric distances -------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("metric",))
def distance_tables(queries, codebooks, metric: str = "ip"):
    """Per query and subspace, the score of the query's sub-vector against every centroid [q, m, K]: the inner
    product ("ip"), or minus the squared distance ("l2"). Summing the entries a code picks gives <q, decode(code)>,
    or -||q - decode(code)||^2: the asymmetric distance (the query is never quantized)."""
    q = split(queries.astype(jnp.float32), codebooks.shape[0])  # [q, m, sub]
    dots = jnp.einsum("qms,mks->qmk", q, codebooks, preferred_element_type=jnp.float32)  # [q, m, K]
    if metric == "ip":
        return dots
    return 2.0 * dots - jnp.sum(q * q, -1)[..., None] - jnp.sum(codebooks * codebooks, -1)[None]


def lookup_scores(tables, codes):
    """Sum over subspaces of the table entry each code picks: tables [q, m, K], codes [q, ..., m] (uint8, each
    query its own candidates) -> [q, ...]. A gather from the query's flattened table (m x K floats, cache-resident),
    summed over m; XLA fuses the index arithmetic and the sum into the gather."""
    q, m, num_centroids = tables.shape
    flat = tables.reshape(q, m * num_centroids)  # [q, m*K]
    index = codes.astype(jnp.int32) + jnp.arange(m, dtype=jnp.int32) * num_centroids  # [q, ..., m]
    picked = jax.vmap(lambda table, idx: table[idx])(flat, index)  # [q, ..., m]
    return jnp.sum(picked, axis=-1)


# ---- float64 NumPy references (tests) -------------------------------------------------------------------------


def anisotropic_loss_reference(x, x_hat, eta):
    """float64 NumPy: eta ||r_par||^2 + ||r_perp||^2 from the explicit projection."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    residual = x - x_hat
    parallel = (np.sum(residual * x, 1) / np.sum(x * x, 1))[:, None] * x
    perpendicular = residual - parallel
    return np.asarray(eta, np.float64) * np.sum(parallel ** 2, 1) + np.sum(perpendicular ** 2, 1)
