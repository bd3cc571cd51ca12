"""rope in both pair layouts against float64 NumPy references written independently (each pair as a
complex number), its gradient (a rotation back), and the layout permutation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import RopeScaling
from llmjax.nn import rope, rope_frequencies, rope_layout_permutation


def reference_interleaved(x, positions, inv_freq):
    """Dims (2i, 2i + 1) form x_2i + 1j x_2i+1, multiplied by exp(1j * position * inv_freq_i)."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * positions[:, :, None, None] * inv_freq)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def reference_half(x, positions, inv_freq):
    """Dims (i, i + d/2) form x_i + 1j x_{i + d/2}."""
    half = x.shape[-1] // 2
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, :, None, None] * inv_freq)
    return np.concatenate([z.real, z.imag], axis=-1)


SCALINGS = [None, RopeScaling("linear", 4.0), RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_seq_len=64)]


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_matches_reference(rng, layout, scaling):
    x = rng.normal(size=(2, 7, 3, 10))
    positions = rng.integers(0, 300, (2, 7))
    got = rope(jnp.asarray(x), jnp.asarray(positions), theta=500.0, scaling=scaling, layout=layout)
    reference = {"half": reference_half, "interleaved": reference_interleaved}[layout]
    want = reference(x, positions, rope_frequencies(10, 500.0, scaling))
    np.testing.assert_allclose(got, want, atol=2e-5)  # angles in float32 (as the model computes them)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gradient_is_the_inverse_rotation(rng, layout):
    """rope is a rotation per position, so its vector-Jacobian product rotates the cotangent back."""
    x, cotangent = rng.normal(size=(1, 5, 2, 8)), rng.normal(size=(1, 5, 2, 8))
    positions = jnp.arange(5)[None] * 7
    grad = jax.grad(lambda x: jnp.sum(rope(x, positions, layout=layout) * cotangent))(x)
    np.testing.assert_allclose(grad, rope(jnp.asarray(cotangent), -positions, layout=layout), atol=1e-6)


def test_layouts_give_equal_scores_after_permuting_the_weights(rng):
    """A checkpoint in one layout is the same model in the other once q/k weights are permuted along head_dim."""
    d_model, heads, head_dim = 12, 2, 6
    x = rng.normal(size=(1, 5, d_model))
    wq, wk = rng.normal(size=(d_model, heads, head_dim)), rng.normal(size=(d_model, heads, head_dim))
    positions = jnp.arange(5)[None]

    def scores(wq, wk, layout):
        q = rope(jnp.einsum("bsd,dhk->bshk", x, wq), positions, layout=layout)
        k = rope(jnp.einsum("bsd,dhk->bshk", x, wk), positions, layout=layout)
        return jnp.einsum("bshk,bthk->bhst", q, k)

    to_interleaved = rope_layout_permutation(head_dim, "half", "interleaved")
    np.testing.assert_allclose(scores(wq[..., to_interleaved], wk[..., to_interleaved], "interleaved"),
                               scores(wq, wk, "half"), rtol=1e-5, atol=1e-5)
    back = rope_layout_permutation(head_dim, "interleaved", "half")
    np.testing.assert_array_equal(wq[..., to_interleaved][..., back], wq)
    np.testing.assert_array_equal(rope_layout_permutation(head_dim, "half", "half"), np.arange(head_dim))


def test_positions_may_be_one_dimensional_and_dtype_is_kept(rng):
    x = jnp.asarray(rng.normal(size=(3, 4, 2, 6)), jnp.bfloat16)
    got = rope(x, jnp.arange(4))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, rope(x, jnp.broadcast_to(jnp.arange(4), (3, 4))))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: rope(jnp.ones((1, 4, 2, 7)), jnp.arange(4)), ValueError,
         r"rope: x \[1, 4, 2, 7\] has an odd head_dim 7; RoPE rotates pairs of dimensions"),
        (lambda: rope(jnp.ones((1, 4, 2, 8)), jnp.arange(5)), ValueError,
         r"rope: positions \[1, 5\] must be \[seq\] or \[batch, seq\] for x \[1, 4, 2, 8\]"),
        (lambda: rope(jnp.ones((1, 4, 2, 8)), jnp.arange(4.0)), TypeError, r"rope: positions must be integers"),
        (lambda: rope(jnp.ones((4, 2, 8)), jnp.arange(4)), ValueError,
         r"rope: x must be \[batch, seq, heads, head_dim\], got shape \[4, 2, 8\]"),
        (lambda: rope(jnp.ones((1, 4, 2, 8)), jnp.arange(4), layout="neox"), ValueError,
         r"rope: layout='neox': expected 'half' or 'interleaved'"),
    ],
)
def test_bad_input_is_one_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
