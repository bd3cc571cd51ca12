"""rms_norm and layer_norm against float64 NumPy (values) and torch autograd (gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.nn import layer_norm, rms_norm

torch = pytest.importorskip("torch")


def numpy_layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    return y * (1 if scale is None else scale) + (0 if bias is None else bias)


def numpy_rms_norm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * (1 if scale is None else scale)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(rng, affine):
    x = rng.normal(3.0, 2.0, size=(3, 7, 37))
    scale, bias = (rng.normal(size=37), rng.normal(size=37)) if affine else (None, None)
    as_jax = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    got = layer_norm(jnp.asarray(x), as_jax(scale), as_jax(bias), 1e-5)
    np.testing.assert_allclose(got, numpy_layer_norm(x, scale, bias, 1e-5), rtol=1e-10, atol=1e-12)

    if affine:
        cotangent = rng.normal(size=x.shape)
        grads = jax.grad(lambda *a: jnp.sum(layer_norm(*a, 1e-5) * cotangent), argnums=(0, 1, 2))(x, scale, bias)
        tx, ts, tb = (torch.tensor(a, requires_grad=True) for a in (x, scale, bias))
        (torch.nn.functional.layer_norm(tx, (37,), ts, tb, 1e-5) * torch.tensor(cotangent)).sum().backward()
        for ours, theirs in zip(grads, (tx.grad, ts.grad, tb.grad)):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm(rng, affine):
    x = rng.normal(size=(2, 5, 29)) * 4
    scale = rng.normal(size=29) if affine else None
    got = rms_norm(jnp.asarray(x), None if scale is None else jnp.asarray(scale), 1e-6)
    np.testing.assert_allclose(got, numpy_rms_norm(x, scale, 1e-6), rtol=1e-10, atol=1e-12)

    if affine:
        cotangent = rng.normal(size=x.shape)
        grads = jax.grad(lambda x, s: jnp.sum(rms_norm(x, s, 1e-6) * cotangent), argnums=(0, 1))(x, scale)
        tx, ts = (torch.tensor(a, requires_grad=True) for a in (x, scale))
        (torch.nn.functional.rms_norm(tx, (29,), ts, 1e-6) * torch.tensor(cotangent)).sum().backward()
        for ours, theirs in zip(grads, (tx.grad, ts.grad)):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-9, atol=1e-11)


def test_bfloat16_input_keeps_its_dtype_with_float32_statistics(rng):
    x = rng.normal(size=(4, 96)).astype(np.float32)
    got = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.ones(96, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    want = numpy_rms_norm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), None, 1e-6)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2)  # one bf16 rounding of the output


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: rms_norm(jnp.ones((2, 3), jnp.int32), jnp.ones(3)), TypeError,
         r"rms_norm: x must be floating point, got int32 \[2, 3\]"),
        (lambda: rms_norm(jnp.ones((2, 3)), jnp.ones(4)), ValueError,
         r"rms_norm: scale has shape \[4\], expected \[3\] \(x's last axis\)"),
        (lambda: layer_norm(jnp.ones((2, 3)), jnp.ones(3), jnp.ones((1, 3))), ValueError,
         r"layer_norm: bias has shape \[1, 3\], expected \[3\]"),
        (lambda: layer_norm(jnp.ones((2, 3)), None, None, 0.0), ValueError, r"layer_norm: eps=0.0 must be > 0"),
    ],
)
def test_bad_input_is_one_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
