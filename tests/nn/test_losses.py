"""cross_entropy against torch.nn.functional.cross_entropy in float64 (values and gradients) and a
NumPy formula for the z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.nn import cross_entropy, token_cross_entropy

torch = pytest.importorskip("torch")


def logsumexp(x):
    top = x.max(-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_matches_torch_with_ignored_targets(rng, reduction, label_smoothing):
    logits = rng.normal(size=(3, 11, 37)) * 3
    targets = rng.integers(0, 37, (3, 11))
    targets[0, :4] = -100
    targets[2, 7] = -100
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=label_smoothing, reduction=reduction)
    t_logits = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(t_logits.reshape(-1, 37), torch.tensor(targets).reshape(-1),
                                             ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), want.detach().numpy().reshape(-1), rtol=1e-12, atol=1e-14)

    cotangent = rng.normal(size=np.shape(got))
    grad = jax.grad(lambda x: jnp.sum(cross_entropy(x, jnp.asarray(targets), label_smoothing=label_smoothing,
                                                    reduction=reduction) * cotangent))(logits)
    (want * torch.tensor(cotangent).reshape(want.shape)).sum().backward()
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_z_loss_and_token_terms(rng):
    logits, targets = rng.normal(size=(5, 23)) * 4, rng.integers(0, 23, 5)
    log_z = logsumexp(logits)
    nll = log_z - logits[np.arange(5), targets]
    got_nll, got_log_z = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(got_nll, nll, rtol=1e-12)
    np.testing.assert_allclose(got_log_z, log_z, rtol=1e-12)
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), z_loss=1e-2, reduction="none")
    np.testing.assert_allclose(got, nll + 1e-2 * log_z**2, rtol=1e-12)


def test_no_counted_target_gives_zero_not_nan():
    loss = cross_entropy(jnp.zeros((2, 5)), jnp.full((2,), -100))
    assert float(loss) == 0.0
    assert float(cross_entropy(jnp.zeros((2, 5)), jnp.array([4, 4]), ignore_index=None)) == pytest.approx(np.log(5))


def test_float32_and_bfloat16_logits_give_float32(rng):
    logits = rng.normal(size=(4, 9)).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        assert cross_entropy(jnp.asarray(logits, dtype), jnp.zeros(4, jnp.int32)).dtype == jnp.float32


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 5), int)), ValueError,
         r"cross_entropy: targets \[2, 5\] must have the shape of logits \[2, 3, 5\] without its last"),
        (lambda: cross_entropy(jnp.zeros((2, 5)), jnp.zeros(2)), TypeError, r"cross_entropy: targets must be integers"),
        (lambda: cross_entropy(jnp.zeros((2, 5)), jnp.zeros(2, int), label_smoothing=1.0), ValueError,
         r"label_smoothing=1.0 must be within \[0, 1\)"),
        (lambda: cross_entropy(jnp.zeros((2, 5)), jnp.zeros(2, int), reduction="avg"), ValueError,
         r"reduction='avg': expected 'mean', 'sum' or 'none'"),
    ],
)
def test_bad_input_is_one_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
