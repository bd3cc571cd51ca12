"""llmjax.retrieval.pq: encode / decode, the anisotropic loss and its gradient against float64 NumPy, anisotropic
training against plain PQ at the same code size, and the lookup-table scores against explicit dot products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.retrieval import pq


def clustered(n, dim, clusters=12, seed=0):
    """Clusters at varied norms (inner-product data: the large-norm points win)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)) * 2
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)) * rng.uniform(0.5, 2, (n, 1))
            ).astype(np.float32)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_decode_of_encoded_centroid_concatenations_is_exact():
    rng = np.random.default_rng(0)
    codebooks = rng.normal(size=(4, 16, 3)).astype(np.float32)  # m=4, K=16, dim 12
    codes = rng.integers(0, 16, (50, 4)).astype(np.uint8)
    vectors = np.asarray(pq.decode(jnp.asarray(codes), jnp.asarray(codebooks)))
    np.testing.assert_array_equal(vectors, np.concatenate([codebooks[s][codes[:, s]] for s in range(4)], 1))
    again = np.asarray(pq.encode(jnp.asarray(vectors), jnp.asarray(codebooks), batch=16))  # chunks of 16
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_array_equal(np.asarray(pq.decode(jnp.asarray(again), jnp.asarray(codebooks))), vectors)


def test_reconstruction_error_is_small_on_clustered_data():
    data = clustered(3000, 16)
    codebooks = pq.train_pq(data, 4, 6, jax.random.key(0))
    approx = np.asarray(pq.decode(pq.encode(jnp.asarray(data), codebooks), codebooks))
    relative = np.mean(np.sum((data - approx) ** 2, 1)) / np.mean(np.sum((data - data.mean(0)) ** 2, 1))
    assert relative < 0.2


def grad_reference(x, x_hat, eta):
    """float64: d/dx_hat of eta ||r_par||^2 + ||r_perp||^2 = -2 (eta r_par + r_perp)."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    residual = x - x_hat
    parallel = (np.sum(residual * x, 1) / np.sum(x * x, 1))[:, None] * x
    return -2.0 * (eta[:, None] * parallel + (residual - parallel))


def test_anisotropic_loss_and_gradient_match_float64_numpy():
    rng = np.random.default_rng(1)
    x, x_hat = rng.normal(size=(40, 24)).astype(np.float32), rng.normal(size=(40, 24)).astype(np.float32)
    eta = rng.uniform(0.5, 20, 40).astype(np.float32)
    np.testing.assert_allclose(np.asarray(pq.anisotropic_loss(x, x_hat, eta)),
                               pq.anisotropic_loss_reference(x, x_hat, eta), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pq.anisotropic_loss_grad(x, x_hat, eta)), grad_reference(x, x_hat, eta),
                               rtol=1e-4, atol=1e-5)
    autodiff = jax.grad(lambda h: pq.anisotropic_loss(x, h, eta).sum())(jnp.asarray(x_hat))
    np.testing.assert_allclose(np.asarray(autodiff), grad_reference(x, x_hat, eta), rtol=1e-4, atol=1e-5)
    # eta = 1 is the squared reconstruction error
    np.testing.assert_allclose(np.asarray(pq.anisotropic_loss(x, x_hat, 1.0)), np.sum((x - x_hat) ** 2, 1), rtol=1e-5)


def test_eta_is_the_papers_threshold_formula():
    squared_norms = jnp.asarray([1.0, 4.0, 0.01])
    eta = np.asarray(pq.anisotropic_eta(squared_norms, 0.2, 128))
    np.testing.assert_allclose(eta[:2], [127 * 0.04 / 0.96, 127 * 0.04 / 3.96], rtol=1e-5)
    assert eta[2] == pytest.approx(127 * 0.9 / 0.1, rel=1e-5)  # ||x|| < T: capped, finite


def test_anisotropic_training_lowers_the_anisotropic_loss_at_equal_code_size():
    data = clustered(3000, 16)
    directions = unit(data)
    # T = 0.4 of the largest norm: in 16 dimensions (eta grows with d - 1) that is a clearly anisotropic weight
    eta = pq.anisotropic_eta(jnp.sum(jnp.asarray(data) ** 2, 1), 0.4 * np.linalg.norm(data, axis=1).max(), 16)
    plain = pq.train_pq(data, 4, 5, jax.random.key(0))
    plain_codes = pq.encode(jnp.asarray(data), plain)

    def loss(codes, codebooks):
        return float(pq.anisotropic_loss(data, pq.decode(codes, codebooks), eta).mean())

    base = loss(plain_codes, plain)
    descended = pq.encode_anisotropic(jnp.asarray(data), jnp.asarray(directions), eta, plain, rounds=2)
    after_codes = loss(descended, plain)
    updated = pq.update_codebooks(jnp.asarray(data), jnp.asarray(directions), eta, descended, plain)
    after_update = loss(descended, updated)
    assert after_codes < base and after_update <= after_codes * (1 + 1e-5)  # each half-step descends
    trained = pq.train_pq(data, 4, 5, jax.random.key(0), directions=directions, eta=eta)
    final = loss(pq.encode_anisotropic(jnp.asarray(data), jnp.asarray(directions), eta, trained), trained)
    assert final < 0.7 * base
    # the parallel error it trades for: plain PQ reconstructs better, anisotropic PQ keeps <q, x> of large x
    parallel = lambda codes, cb: float(pq.anisotropic_loss(data, pq.decode(codes, cb), 2.0).mean()  # noqa: E731
                                       - pq.anisotropic_loss(data, pq.decode(codes, cb), 1.0).mean())
    assert parallel(pq.encode_anisotropic(jnp.asarray(data), jnp.asarray(directions), eta, trained), trained) < \
        parallel(plain_codes, plain)


def test_anisotropic_codes_descend_from_any_start():
    rng = np.random.default_rng(2)
    data = clustered(500, 12)
    codebooks = jnp.asarray(rng.normal(size=(3, 8, 4)).astype(np.float32))
    eta = jnp.full(500, 6.0)
    start = pq.encode(jnp.asarray(data), codebooks)
    codes = pq.encode_anisotropic(jnp.asarray(data), jnp.asarray(unit(data)), eta, codebooks, rounds=3, batch=128)
    before = np.asarray(pq.anisotropic_loss(data, pq.decode(start, codebooks), eta))
    after = np.asarray(pq.anisotropic_loss(data, pq.decode(codes, codebooks), eta))
    assert (after <= before + 1e-4).all() and after.mean() < before.mean()


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_lookup_scores_equal_explicit_scores_of_the_decoded_vectors(metric):
    rng = np.random.default_rng(3)
    codebooks = rng.normal(size=(4, 16, 5)).astype(np.float32)
    queries = rng.normal(size=(7, 20)).astype(np.float32)
    codes = rng.integers(0, 16, (7, 3, 11, 4)).astype(np.uint8)  # each query its own [3, 11] candidates
    tables = pq.distance_tables(jnp.asarray(queries), jnp.asarray(codebooks), metric)
    assert tables.shape == (7, 4, 16)
    got = np.asarray(pq.lookup_scores(tables, jnp.asarray(codes)))
    decoded = np.asarray(pq.decode(jnp.asarray(codes), jnp.asarray(codebooks))).astype(np.float64)  # [7, 3, 11, 20]
    q = queries.astype(np.float64)[:, None, None, :]
    want = np.sum(q * decoded, -1) if metric == "ip" else -np.sum((q - decoded) ** 2, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
