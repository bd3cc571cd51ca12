"""clip_by_global_norm against a float64 NumPy reference: values, gradients, dtypes, edge norms, optax.

tests/nn/conftest.py runs every test here under x64; the float32 behaviour is checked inside
`jax.enable_x64(False)`.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from llmjax.nn.clip import clip_by_global_norm, global_norm


def random_tree(rng, scale=1.0):
    """Awkward shapes, nested containers, mixed float dtypes."""
    return {
        "w": (scale * rng.standard_normal((7, 13))).astype(np.float32),
        "layers": [(scale * rng.standard_normal((3, 5, 2))).astype(np.float32),
                   (scale * rng.standard_normal(211)).astype(ml_dtypes.bfloat16)],
        "pair": ((scale * rng.standard_normal(())).astype(np.float32), (scale * rng.standard_normal(1)).astype(np.float32)),
    }


def numpy_clip(tree, max_norm):
    """float64 reference: (leaves * min(1, max_norm / norm), norm)."""
    leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]
    norm = np.sqrt(sum((leaf**2).sum() for leaf in leaves))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return [leaf * scale for leaf in leaves], norm


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_norm", [0.37, 5.0, 1e4])
def test_values_match_float64_numpy(seed, max_norm, x64):
    tree = random_tree(np.random.default_rng(seed), scale=[0.01, 1.0, 3.0, 100.0][seed])
    with jax.enable_x64(x64):
        clipped, norm = jax.jit(clip_by_global_norm, static_argnums=1)(jax.tree.map(jnp.asarray, tree), max_norm)
        assert norm.dtype == (jnp.float64 if x64 else jnp.float32)
    want_leaves, want_norm = numpy_clip(tree, max_norm)
    np.testing.assert_allclose(float(norm), want_norm, rtol=1e-14 if x64 else 2e-6)
    for got, want, original in zip(jax.tree.leaves(clipped), want_leaves, jax.tree.leaves(tree), strict=True):
        assert got.dtype == original.dtype and got.shape == original.shape
        # scaling in float32 / float64 leaves one rounding to the leaf's dtype: half a unit in the last place
        tolerance = {jnp.bfloat16: 2**-8 + 1e-6, jnp.float32: 1.2e-7 if x64 else 2e-6}[got.dtype.type]
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance, atol=1e-30)
    assert jax.tree.structure(clipped) == jax.tree.structure(jax.tree.map(jnp.asarray, tree))


def test_float64_under_x64():
    tree = {"a": np.random.default_rng(5).standard_normal((9, 4)), "b": np.arange(1.0, 4.0)}
    with jax.enable_x64(True):  # float64 leaves, float64 norm
        clipped, norm = clip_by_global_norm(jax.tree.map(jnp.asarray, tree), 2.5)
        assert norm.dtype == jnp.float64
        want_leaves, want_norm = numpy_clip(tree, 2.5)
        np.testing.assert_allclose(float(norm), want_norm, rtol=1e-14)
        for got, want in zip(jax.tree.leaves(clipped), want_leaves, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-14)


def numpy_clip_vjp(grads, cotangent, max_norm):
    """d/dg of sum(cotangent * clip(g)): c * s + (sum c.g) * ds/dg, with s = max_norm / |g| where it clips."""
    g = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(grads)])
    c = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(cotangent)])
    norm = np.sqrt((g**2).sum())
    if norm <= max_norm:
        return c
    return c * max_norm / norm - (c @ g) * max_norm * g / norm**3


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_gradient_matches_float64_numpy(seed, max_norm):
    rng = np.random.default_rng(seed + 10)
    grads = {"w": rng.standard_normal((6, 5)).astype(np.float32), "b": [rng.standard_normal(3).astype(np.float32)]}
    cotangent = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), grads)

    def weighted_sum(g):
        clipped, _ = clip_by_global_norm(g, max_norm)
        return sum(jnp.sum(c * x) for c, x in zip(jax.tree.leaves(cotangent), jax.tree.leaves(clipped), strict=True))

    got = jax.grad(weighted_sum)(jax.tree.map(jnp.asarray, grads))
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got)])
    np.testing.assert_allclose(got, numpy_clip_vjp(grads, cotangent, max_norm), rtol=2e-5, atol=1e-6)


def test_zero_gradients_pass_through_with_finite_gradient():
    zeros = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(2)}
    clipped, norm = clip_by_global_norm(zeros, 1.0)
    assert float(norm) == 0.0 and all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(clipped))
    gradient = jax.grad(lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(clip_by_global_norm(g, 1.0)[0])))(zeros)
    for leaf in jax.tree.leaves(gradient):
        np.testing.assert_array_equal(leaf, np.ones(leaf.shape))
    empty_clipped, empty_norm = clip_by_global_norm({}, 1.0)
    assert empty_clipped == {} and float(empty_norm) == 0.0


def test_non_finite_norms_propagate():
    with_nan = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.ones(3)}
    clipped, norm = clip_by_global_norm(with_nan, 1.0)
    assert np.isnan(float(norm)) and all(np.all(np.isnan(np.asarray(x))) for x in jax.tree.leaves(clipped))
    with_inf = {"a": jnp.array([1.0, jnp.inf]), "b": jnp.ones(3)}
    clipped, norm = clip_by_global_norm(with_inf, 1.0)
    assert np.isinf(float(norm))
    np.testing.assert_array_equal(clipped["b"], np.zeros(3))
    assert np.isnan(np.asarray(clipped["a"])[1])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_norm", [0.1, 2.0, 50.0])
def test_equals_optax_update(seed, max_norm):
    rng = np.random.default_rng(seed + 20)
    grads = {"w": jnp.asarray(rng.standard_normal((5, 9)), jnp.float32),
             "rest": (jnp.asarray(rng.standard_normal(17), jnp.float32),)}
    with jax.enable_x64(False):  # both in float32
        want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        got, norm = clip_by_global_norm(grads, max_norm)
    np.testing.assert_allclose(float(norm), float(optax.tree.norm(grads)), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bfloat16_norm_is_accumulated_in_float32():
    """4097 bf16 ones: the sum of squares 4097 is exact in float32 but not in bfloat16 (it rounds to 4096)."""
    ones = jnp.ones(4097, jnp.bfloat16)
    with jax.enable_x64(False):
        norm = global_norm({"x": ones})
        clipped, _ = clip_by_global_norm({"x": ones}, 32.0)
    assert norm.dtype == jnp.float32
    assert float(norm) == pytest.approx(np.sqrt(4097.0), rel=1e-7)
    assert clipped["x"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(clipped["x"], np.float64), 32.0 / np.sqrt(4097.0), rtol=4e-3)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan")])
def test_non_positive_max_norm_is_refused(max_norm):
    with pytest.raises(ValueError, match=rf"clip_by_global_norm: max_norm={max_norm} must be > 0"):
        clip_by_global_norm({"x": jnp.ones(3)}, max_norm)
