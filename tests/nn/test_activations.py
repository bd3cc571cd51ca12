"""Activations, gated units and softmax against float64 NumPy (values) and torch autograd (gradients)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.nn import geglu, gelu, log_softmax, silu, softmax, swiglu

torch = pytest.importorskip("torch")
F = torch.nn.functional

erf = np.vectorize(math.erf)


def torch_grad(function, *arrays, cotangent):
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    (function(*tensors) * torch.tensor(cotangent)).sum().backward()
    return [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize(
    "ours, numpy_reference, torch_reference",
    [
        (lambda x: gelu(x), lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))), lambda x: F.gelu(x)),
        (lambda x: gelu(x, approximate=True),
         lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
         lambda x: F.gelu(x, approximate="tanh")),
        (silu, lambda x: x / (1 + np.exp(-x)), F.silu),
    ],
)
def test_activation(rng, ours, numpy_reference, torch_reference):
    x = rng.normal(size=(5, 33)) * 3
    np.testing.assert_allclose(ours(jnp.asarray(x)), numpy_reference(x), rtol=1e-12, atol=1e-14)
    cotangent = rng.normal(size=x.shape)
    grad = jax.grad(lambda x: jnp.sum(ours(x) * cotangent))(x)
    np.testing.assert_allclose(grad, torch_grad(torch_reference, x, cotangent=cotangent)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gated", ["swiglu", "geglu", "geglu_tanh"])
def test_gated_units(rng, gated):
    gate, up = rng.normal(size=(3, 4, 19)), rng.normal(size=(3, 4, 19))
    ours = {"swiglu": swiglu, "geglu": geglu, "geglu_tanh": lambda g, u: geglu(g, u, approximate=True)}[gated]
    theirs = {"swiglu": lambda g, u: F.silu(g) * u, "geglu": lambda g, u: F.gelu(g) * u,
              "geglu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u}[gated]
    want = theirs(torch.tensor(gate), torch.tensor(up)).numpy()
    np.testing.assert_allclose(ours(jnp.asarray(gate), jnp.asarray(up)), want, rtol=1e-12, atol=1e-14)
    cotangent = rng.normal(size=gate.shape)
    grads = jax.grad(lambda g, u: jnp.sum(ours(g, u) * cotangent), argnums=(0, 1))(gate, up)
    for got, expected in zip(grads, torch_grad(theirs, gate, up, cotangent=cotangent)):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def numpy_softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_and_log_softmax_any_axis(rng, axis):
    x = rng.normal(size=(4, 7, 13)) * 5
    np.testing.assert_allclose(softmax(jnp.asarray(x), axis), numpy_softmax(x, axis), rtol=1e-12, atol=1e-15)
    shifted = x - x.max(axis, keepdims=True)
    want_log = shifted - np.log(np.exp(shifted).sum(axis, keepdims=True))
    np.testing.assert_allclose(log_softmax(jnp.asarray(x), axis), want_log, rtol=1e-12, atol=1e-15)
    cotangent = rng.normal(size=x.shape)
    for ours, theirs in ((softmax, torch.softmax), (log_softmax, torch.log_softmax)):
        grad = jax.grad(lambda x: jnp.sum(ours(x, axis) * cotangent))(x)
        want = torch_grad(lambda t: theirs(t, axis), x, cotangent=cotangent)[0]
        np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-12)


def test_softmax_is_stable_for_huge_logits():
    x = jnp.asarray([[1e4, 1e4 - 1.0, -1e4], [-1e30, 0.0, -jnp.inf]], jnp.float32)
    probs = softmax(x)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[0], numpy_softmax(np.array([1.0, 0.0, -2e4]), -1), rtol=1e-6)
    np.testing.assert_allclose(probs[1], [0.0, 1.0, 0.0])
    assert log_softmax(x)[1, 2] == -np.inf
    assert softmax(jnp.ones((2, 3), jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: swiglu(jnp.ones((2, 3)), jnp.ones((2, 4))), ValueError,
         r"swiglu: gate \[2, 3\] and up \[2, 4\] must have the same shape"),
        (lambda: softmax(jnp.ones((2, 3)), axis=2), ValueError, r"softmax: axis=2 is out of range for x of shape \[2, 3\]"),
        (lambda: gelu(jnp.ones(3, jnp.int32)), TypeError, r"gelu: x must be floating point, got int32 \[3\]"),
    ],
)
def test_bad_input_is_one_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
