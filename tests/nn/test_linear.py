"""linear and embedding against float64 NumPy (values) and torch autograd (gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.nn import embedding, linear

torch = pytest.importorskip("torch")


def test_linear_matches_numpy_and_torch_gradients(rng):
    x, w, b = rng.normal(size=(3, 5, 7)), rng.normal(size=(7, 11)), rng.normal(size=(11,))
    np.testing.assert_allclose(linear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)), x @ w + b, rtol=1e-12)
    np.testing.assert_allclose(linear(jnp.asarray(x), jnp.asarray(w)), x @ w, rtol=1e-12)

    cotangent = rng.normal(size=(3, 5, 11))
    grads = jax.grad(lambda x, w, b: jnp.sum(linear(x, w, b) * cotangent), argnums=(0, 1, 2))(x, w, b)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    (torch.nn.functional.linear(tx, tw.T, tb) * torch.tensor(cotangent)).sum().backward()
    for ours, theirs in zip(grads, (tx.grad, tw.grad, tb.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12)


def test_linear_contracts_several_axes(rng):
    """The attention output projection: [batch, seq, heads, head_dim] x [heads, head_dim, d_model]."""
    x, w, b = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(4, 5, 6)), rng.normal(size=(6,))
    want = np.einsum("bshk,hkd->bsd", x, w) + b
    np.testing.assert_allclose(linear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), in_dims=2), want, rtol=1e-12)
    q_kernel = rng.normal(size=(6, 4, 5))  # [d_model, heads, head_dim]: output axes kept
    assert linear(jnp.ones((2, 3, 6)), jnp.asarray(q_kernel)).shape == (2, 3, 4, 5)


def test_embedding_rows_and_gradient(rng):
    table, ids = rng.normal(size=(13, 6)), rng.integers(0, 13, (4, 9))
    np.testing.assert_array_equal(embedding(jnp.asarray(table), jnp.asarray(ids)), table[ids])
    cotangent = rng.normal(size=(4, 9, 6))
    grad = jax.grad(lambda t: jnp.sum(embedding(t, ids) * cotangent))(table)
    want = np.zeros_like(table)
    np.add.at(want, ids, cotangent)  # repeated ids accumulate
    np.testing.assert_allclose(grad, want, rtol=1e-12)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: linear(jnp.ones((2, 5)), jnp.ones((4, 3))), ValueError,
         r"linear: the last 1 axes of x \[2, 5\] must equal the first 1 of kernel \[4, 3\]"),
        (lambda: linear(jnp.ones((2, 4)), jnp.ones((4, 3)), jnp.ones(4)), ValueError,
         r"linear: bias has shape \[4\], expected \[3\]"),
        (lambda: linear(jnp.ones((2, 4), jnp.int32), jnp.ones((4, 3))), TypeError, r"linear: x must be floating point"),
        (lambda: embedding(jnp.ones((5, 3)), jnp.ones((2,))), TypeError, r"embedding: ids must be integers"),
        (lambda: embedding(jnp.ones((5,)), jnp.ones((2,), int)), ValueError,
         r"embedding: table must be \[num_embeddings, dim\], got shape \[5\]"),
    ],
)
def test_bad_input_is_one_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
