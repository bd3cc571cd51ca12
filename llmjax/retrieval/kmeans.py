"""k-means in JAX: k-means++ seeding, then Lloyd iterations (matmul assignment + segment-sum update).

    centroids, costs = kmeans(points, 1024, key=jax.random.key(0))   # [k, dim], [iters] (objective per iteration)
    labels, dists = assign(points, centroids)                        # [n] int32, [n] squared distances

Used by the IVF coarse quantizer (one problem) and by product quantization (one problem per subspace, vmapped:
every function here is a pure, jitted function of arrays, so `jax.vmap` runs the m subspace problems as one).

- Assignment is `||c||^2 - 2 x.c` (one matmul per chunk of `batch` points, so memory stays at batch x k scores
  however many points there are).
- An empty cluster is re-seeded with a point far from its centroid (the farthest points, one per empty cluster),
  so every centroid keeps being used; this is what faiss does too (it splits a big cluster instead).
- Seeding is k-means++ (D^2 sampling) on a random sample of at most `seed_sample` points: k sequential steps, each
  one pass over the sample. `init="random"` takes k distinct random points instead (cheaper, a little worse).
- metric="ip": points go to the centroid of largest inner product (centroids stay means), as faiss trains an
  inner-product IVF: the lists then match how a query ranks them (by <q, c>); the objective is -sum(x.c).
  metric="cosine" (spherical k-means): points and centroids at unit length, the largest inner product; the
  objective is sum(1 - x.c).
Deterministic given the key: the same points, k and key give the same centroids on one device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _normalize(x):
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norms > 0, norms, 1.0)


METRICS = ("l2", "ip", "cosine")


@functools.partial(jax.jit, static_argnames=("batch", "metric"))
def assign(points, centroids, *, batch: int = 4096, metric: str = "l2"):
    """(labels int32 [n], costs float32 [n]): each point's nearest centroid and its squared distance to it
    ("ip": the largest inner product, cost -x.c; "cosine": the same on unit vectors, cost 1 - x.c).
    points [n, dim], centroids [k, dim]."""
    n, dim = points.shape
    batch = min(batch, n)
    padded = -(-n // batch) * batch
    chunks = jnp.pad(points, ((0, padded - n), (0, 0))).reshape(-1, batch, dim)  # [chunks, batch, dim]
    centroid_norms = jnp.sum(centroids * centroids, axis=-1)  # [k]

    def one(chunk):  # [batch, dim]
        dots = jnp.dot(chunk, centroids.T, preferred_element_type=jnp.float32)  # [batch, k]
        scores = dots if metric != "l2" else 2.0 * dots - centroid_norms[None, :]
        labels = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        best = jnp.max(scores, axis=-1)
        if metric == "ip":
            return labels, -best
        costs = 1.0 - best if metric == "cosine" else jnp.sum(chunk * chunk, axis=-1) - best
        return labels, jnp.maximum(costs, 0.0)

    labels, costs = jax.lax.map(one, chunks)
    return labels.reshape(-1)[:n], costs.reshape(-1)[:n]


def lloyd_step(points, centroids, *, batch: int = 4096, metric: str = "l2"):
    """One Lloyd iteration: (new centroids [k, dim], objective of the *old* centroids). Empty clusters take the
    points with the largest costs (one each)."""
    k = centroids.shape[0]
    labels, costs = assign(points, centroids, batch=batch, metric=metric)
    sums = jax.ops.segment_sum(points, labels, num_segments=k)  # [k, dim]
    counts = jax.ops.segment_sum(jnp.ones_like(costs), labels, num_segments=k)  # [k]
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    empty = counts == 0
    _, farthest = jax.lax.top_k(costs, k)  # [k] the worst-served points, worst first
    slot = jnp.cumsum(empty) - 1  # the i-th empty cluster takes the i-th farthest point
    centroids = jnp.where(empty[:, None], points[farthest[jnp.maximum(slot, 0)]], means)
    return (_normalize(centroids) if metric == "cosine" else centroids), jnp.sum(costs)


def kmeans_plus_plus(points, k: int, key):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centroid is a point drawn with probability
    proportional to its squared distance to the nearest centroid chosen so far. [k, dim]."""
    n, dim = points.shape
    first_key, key = jax.random.split(key)
    first = points[jax.random.randint(first_key, (), 0, n)]
    centroids = jnp.zeros((k, dim), points.dtype).at[0].set(first)
    nearest = jnp.sum((points - first) ** 2, axis=-1)  # [n]

    def step(i, carry):
        centroids, nearest = carry
        logits = jnp.where(nearest > 0, jnp.log(jnp.maximum(nearest, 1e-30)), -jnp.inf)
        # all points coincide with chosen centroids (fewer distinct points than k): draw uniformly instead
        logits = jnp.where(jnp.isfinite(logits).any(), logits, 0.0)
        pick = points[jax.random.categorical(jax.random.fold_in(key, i), logits)]
        nearest = jnp.minimum(nearest, jnp.sum((points - pick) ** 2, axis=-1))
        return centroids.at[i].set(pick), nearest

    centroids, _ = jax.lax.fori_loop(1, k, step, (centroids, nearest))
    return centroids


@functools.partial(jax.jit, static_argnames=("k", "iters", "init", "metric", "batch", "seed_sample"))
def kmeans(points, k: int, key, *, iters: int = 20, init: str = "kmeans++", metric: str = "l2",
           batch: int = 4096, seed_sample: int = 65536):
    """(centroids [k, dim] float32, costs [iters] float32: the objective before each Lloyd step).

    points [n, dim] with n >= k (the caller checks: a clear error belongs to the caller, who knows the flag)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {', '.join(METRICS)}")
    points = points.astype(jnp.float32)
    if metric == "cosine":
        points = _normalize(points)
    n = points.shape[0]
    init_key, sample_key = jax.random.split(key)
    if init == "kmeans++":
        sample = points if n <= seed_sample else points[jax.random.choice(sample_key, n, (seed_sample,),
                                                                          replace=False)]
        centroids = kmeans_plus_plus(sample, k, init_key)
    elif init == "random":
        centroids = points[jax.random.choice(init_key, n, (k,), replace=False)]
    else:
        raise ValueError(f"init={init!r}: expected 'kmeans++' or 'random'")
    if metric == "cosine":
        centroids = _normalize(centroids)

    def step(centroids, _):
        centroids, cost = lloyd_step(points, centroids, batch=batch, metric=metric)
        return centroids, cost

    return jax.lax.scan(step, centroids, None, length=iters)
