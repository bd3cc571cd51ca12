"""InfoNCE with in-batch and hard negatives against a float64 NumPy loop reference: values, gradients, masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.retrieval.contrastive import candidate_mask, info_nce_loss, info_nce_reference


def _batch(seed, batch=5, hard=3, dim=8):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim)), rng.normal(size=(batch, hard, dim)))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_hard", [False, True])
def test_loss_matches_the_float64_reference(symmetric, with_hard):
    queries, positives, hard = _batch(0)
    hard = hard if with_hard else None
    with jax.enable_x64(True):
        got = info_nce_loss(jnp.asarray(queries), jnp.asarray(positives), None if hard is None else jnp.asarray(hard),
                            temperature=0.7, symmetric=symmetric)
        assert got.dtype == jnp.float64
    want = info_nce_reference(queries, positives, hard, temperature=0.7, symmetric=symmetric)
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    got32 = info_nce_loss(jnp.asarray(queries, jnp.float32), jnp.asarray(positives, jnp.float32),
                          None if hard is None else jnp.asarray(hard, jnp.float32), temperature=0.7,
                          symmetric=symmetric)
    np.testing.assert_allclose(float(got32), want, rtol=1e-5)


def test_gradient_matches_finite_differences_of_the_reference():
    queries, positives, hard = _batch(1, batch=4, hard=2, dim=5)
    doc_ids, hard_ids = np.array([0, 1, 1, 2]), np.array([[5, 1], [6, 7], [0, 8], [8, 8]])  # duplicates on purpose
    with jax.enable_x64(True):
        grads = jax.grad(lambda q, p, h: info_nce_loss(q, p, h, temperature=0.5, symmetric=True,
                                                       doc_ids=jnp.asarray(doc_ids), hard_ids=jnp.asarray(hard_ids)),
                         argnums=(0, 1, 2))(jnp.asarray(queries), jnp.asarray(positives), jnp.asarray(hard))
    arrays = [queries, positives, hard]
    step = 1e-6
    for which, grad in enumerate(grads):
        numeric = np.zeros_like(arrays[which])
        for index in np.ndindex(arrays[which].shape):
            values = []
            for sign in (1, -1):
                moved = [a.copy() for a in arrays]
                moved[which][index] += sign * step
                values.append(info_nce_reference(*moved, temperature=0.5, symmetric=True, doc_ids=doc_ids,
                                                 hard_ids=hard_ids))
            numeric[index] = (values[0] - values[1]) / (2 * step)
        np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-6)
    assert np.abs(np.asarray(grads[2])[3, 1]).max() == 0  # a repeated hard negative counts once: no gradient


def test_a_positive_is_never_its_own_negative():
    # queries 0 and 2 share document 7; query 1's hard negatives hold its own positive (9) and a repeat of doc 4
    doc_ids = jnp.array([7, 9, 7, 4])
    hard_ids = jnp.array([[7, 1], [9, 4], [3, 3], [4, 2]])
    keep = np.asarray(candidate_mask(doc_ids, hard_ids))
    want = np.array([
        # in-batch columns 0..3 (ids 7 9 7 4), then hard negatives
        [1, 1, 0, 1, 0, 1],   # column 2 is doc 7 again (its positive); hard 7 too
        [1, 1, 0, 1, 0, 0],   # column 2 repeats doc 7 (counted once); hard 9 is its positive, hard 4 a repeat
        [0, 1, 1, 1, 1, 0],   # column 0 is its positive's duplicate; hard 3 twice counts once
        [1, 1, 0, 1, 0, 1],   # column 2 repeats doc 7; hard 4 is its positive
    ], bool)
    np.testing.assert_array_equal(keep, want)
    rng = np.random.default_rng(3)
    queries, positives, hard = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(4, 2, 6))
    positives[2] = positives[0]  # the same document has the same embedding
    got = info_nce_loss(jnp.asarray(queries, jnp.float32), jnp.asarray(positives, jnp.float32),
                        jnp.asarray(hard, jnp.float32), temperature=0.3, doc_ids=doc_ids, hard_ids=hard_ids)
    want_loss = info_nce_reference(queries, positives, hard, temperature=0.3, doc_ids=np.asarray(doc_ids),
                                   hard_ids=np.asarray(hard_ids))
    np.testing.assert_allclose(float(got), want_loss, rtol=1e-5)
    unmasked = info_nce_reference(queries, positives, hard, temperature=0.3)  # counting duplicates as negatives
    assert abs(unmasked - want_loss) > 1e-3


def test_bad_input_is_one_clear_error():
    queries, positives, hard = _batch(2)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(jnp.asarray(queries), jnp.asarray(positives), temperature=0.0)
    with pytest.raises(ValueError, match="do not fit"):
        info_nce_loss(jnp.asarray(queries), jnp.asarray(positives[:3]))
    with pytest.raises(ValueError, match="hard_ids"):
        info_nce_loss(jnp.asarray(queries), jnp.asarray(positives), jnp.asarray(hard), doc_ids=jnp.arange(5))
