"""llmjax.retrieval.kmeans: Lloyd iterations against NumPy, a falling objective, empty clusters re-seeded,
chunked assignment, determinism, the spherical variant."""

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.retrieval.kmeans import assign, kmeans, lloyd_step


def clustered(n, dim, clusters=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)) * 4
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def numpy_lloyd(points, centroids, iters):
    """float64 textbook Lloyd (no empty clusters on this data)."""
    points, centroids = points.astype(np.float64), centroids.astype(np.float64)
    for _ in range(iters):
        labels = np.argmin(((points[:, None] - centroids[None]) ** 2).sum(-1), 1)
        centroids = np.stack([points[labels == j].mean(0) for j in range(len(centroids))])
    return centroids


def test_lloyd_matches_numpy_from_the_same_start():
    points = clustered(300, 5)
    start, _ = kmeans(jnp.asarray(points), 6, jax.random.key(3), iters=0)  # the k-means++ seeds alone
    ours, _ = kmeans(jnp.asarray(points), 6, jax.random.key(3), iters=7)
    np.testing.assert_allclose(np.asarray(ours), numpy_lloyd(points, np.asarray(start), 7), rtol=1e-4, atol=1e-4)


def test_objective_falls_and_ends_near_the_true_clusters():
    points = clustered(2000, 16, clusters=8)
    centroids, costs = kmeans(jnp.asarray(points), 8, jax.random.key(0), iters=10)
    costs = np.asarray(costs)
    assert (np.diff(costs) <= 1e-3 * costs[0]).all()  # Lloyd never raises the objective
    _, final = assign(jnp.asarray(points), centroids)
    assert float(final.mean()) < 1.2 * 16  # ~ the within-cluster variance (16 unit-variance dimensions)


def test_empty_clusters_are_reseeded():
    points = jnp.asarray(clustered(500, 4))
    centroids = jnp.concatenate([points[:3], jnp.full((3, 4), 1e4)])  # three centroids far from every point
    new, _ = lloyd_step(points, centroids)
    labels, _ = assign(points, new)
    assert np.abs(np.asarray(new)).max() < 1e3
    assert len(np.unique(np.asarray(labels))) == 6  # every cluster holds points again


def test_chunked_assignment_equals_one_chunk():
    points, centroids = jnp.asarray(clustered(1001, 8)), jnp.asarray(clustered(13, 8, seed=1))
    full, chunked = assign(points, centroids, batch=4096), assign(points, centroids, batch=64)  # 64 does not divide
    np.testing.assert_array_equal(np.asarray(full[0]), np.asarray(chunked[0]))
    np.testing.assert_allclose(np.asarray(full[1]), np.asarray(chunked[1]), rtol=1e-5, atol=1e-4)


def test_deterministic_given_the_key_and_random_init():
    points = jnp.asarray(clustered(800, 8))
    a, _ = kmeans(points, 16, jax.random.key(7), iters=5)
    b, _ = kmeans(points, 16, jax.random.key(7), iters=5)
    c, _ = kmeans(points, 16, jax.random.key(7), iters=5, init="random")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(c)).all() and len(np.unique(np.asarray(c), axis=0)) == 16


def test_spherical_centroids_are_unit_and_assign_by_cosine():
    points = clustered(600, 8)
    centroids, costs = kmeans(jnp.asarray(points), 5, jax.random.key(1), iters=6, metric="cosine")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(centroids), axis=1), 1.0, rtol=1e-5)
    labels, _ = assign(jnp.asarray(points), centroids, metric="cosine")
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(labels), np.argmax(unit @ np.asarray(centroids).T, 1))
    assert (np.diff(np.asarray(costs)) <= 1e-3).all()
