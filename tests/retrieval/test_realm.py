"""REALM / RAG marginal likelihoods against explicit float64 sums, their gradients against the posterior formula,
and one training step of the towers moving probability toward the document that makes the target likely."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.model import init_params
from llmjax.retrieval.realm import (marginal_nll, realm_loss, retrieval_logits, retrieved_log_likelihoods,
                                    token_marginal_nll)


def explicit_sequence_nll(logits, likelihood) -> np.ndarray:
    """-log sum_k p(z_k|x) p(y|z_k,x), p(z|x) a softmax, by loops in float64."""
    out = []
    for row_logits, row_likelihood in zip(np.asarray(logits, np.float64), np.asarray(likelihood, np.float64)):
        finite = [s for s in row_logits if np.isfinite(s)]
        norm = sum(math.exp(s) for s in finite)
        total = sum(math.exp(s) / norm * math.exp(ll) for s, ll in zip(row_logits, row_likelihood) if np.isfinite(s))
        out.append(-math.log(total))
    return np.array(out)


def explicit_token_nll(logits, token_likelihood, mask) -> np.ndarray:
    logits, token_likelihood = np.asarray(logits, np.float64), np.asarray(token_likelihood, np.float64)
    out = []
    for b in range(len(logits)):
        prior = np.exp(logits[b] - logits[b].max())
        prior /= prior.sum()
        nll = 0.0
        for t in range(token_likelihood.shape[2]):
            if mask[b, t]:
                nll -= math.log(sum(prior[k] * math.exp(token_likelihood[b, k, t]) for k in range(len(prior))))
        out.append(nll)
    return np.array(out)


def test_sequence_marginal_equals_the_explicit_sum():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 5))
    logits[1, 4] = -np.inf  # a slot with no document
    likelihood = rng.normal(-20, 8, (3, 5))  # log p(y | z, x) of a whole target: far below 0
    got = np.asarray(marginal_nll(jnp.asarray(logits, jnp.float32), jnp.asarray(likelihood, jnp.float32)))
    np.testing.assert_allclose(got, explicit_sequence_nll(logits, likelihood), rtol=1e-5, atol=1e-4)


def test_token_marginal_equals_the_explicit_sum_and_one_token_is_the_sequence_marginal():
    rng = np.random.default_rng(1)
    logits, token_ll = rng.normal(0, 2, (2, 3)), rng.normal(-3, 1.5, (2, 3, 7))
    mask = rng.random((2, 7)) < 0.7
    got = np.asarray(token_marginal_nll(jnp.asarray(logits), jnp.asarray(token_ll), jnp.asarray(mask)))
    np.testing.assert_allclose(got, explicit_token_nll(logits, token_ll, mask), rtol=1e-5)
    one = token_marginal_nll(jnp.asarray(logits), jnp.asarray(token_ll[:, :, :1]))
    np.testing.assert_allclose(one, marginal_nll(jnp.asarray(logits), jnp.asarray(token_ll[:, :, 0])), rtol=1e-6)


def test_gradient_is_prior_minus_posterior():
    """d(-log p(y|x)) / d logit_k = p(z_k | x) - p(z_k | x, y): documents that explain y better than the retriever
    expected gain score."""
    rng = np.random.default_rng(2)
    logits, likelihood = rng.normal(0, 1, (4, 6)), rng.normal(-5, 2, (4, 6))
    grad = jax.grad(lambda s: marginal_nll(s, jnp.asarray(likelihood)).sum())(jnp.asarray(logits))
    prior = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    joint = prior * np.exp(likelihood)
    np.testing.assert_allclose(grad, prior - joint / joint.sum(axis=1, keepdims=True), atol=1e-5)


@pytest.fixture(scope="module")
def encoder():
    cfg = get_config("bert-tiny", num_layers=1, compute_dtype="float32")
    return init_params(cfg, jax.random.key(0)), cfg


def test_a_training_step_moves_probability_to_the_document_that_explains_the_target(encoder):
    params, cfg = encoder
    rng = np.random.default_rng(3)
    size, k, length = 2, 3, 6
    batch = {"query_tokens": jnp.asarray(rng.integers(5, cfg.vocab_size, (size, length)), jnp.int32),
             "query_mask": jnp.ones((size, length), bool),
             "doc_tokens": jnp.asarray(rng.integers(5, cfg.vocab_size, (size, k, length)), jnp.int32),
             "doc_mask": jnp.ones((size, k, length), bool),
             "lm_log_likelihood": jnp.asarray([[-2.0, -30.0, -30.0], [-30.0, -30.0, -2.0]])}  # z_0, then z_2 explain y
    temperature = 0.05
    loss, grads = jax.value_and_grad(realm_loss, argnums=(0, 1))(params, params, batch, cfg, temperature)
    assert np.isfinite(float(loss))
    moved = [jax.tree.map(lambda p, g: p - 0.05 * g, params, g) for g in grads]
    before = jax.nn.softmax(retrieval_logits(params, params, batch, cfg, temperature), axis=-1)
    after = jax.nn.softmax(retrieval_logits(*moved, batch, cfg, temperature), axis=-1)
    assert float(after[0, 0]) > float(before[0, 0]) and float(after[1, 2]) > float(before[1, 2]), (before, after)
    assert float(realm_loss(*moved, batch, cfg, temperature)) < float(loss)
    with pytest.raises(ValueError, match="marginal='tokens'"):
        realm_loss(params, params, batch, cfg, temperature, marginal="tokens")


def test_retrieved_log_likelihoods_score_each_row_on_its_own():
    from llmjax.evaluation import target_token_losses

    cfg = get_config("llama-tiny", num_layers=1, max_seq_len=32, compute_dtype="float32")
    params = init_params(cfg, jax.random.key(1))
    rows = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 3, 12))
    summed = retrieved_log_likelihoods(params, cfg, rows, 4)
    per_token = retrieved_log_likelihoods(params, cfg, rows, 4, per_token=True)
    assert summed.shape == (2, 3) and per_token.shape == (2, 3, 4)
    np.testing.assert_allclose(per_token.sum(-1), summed, rtol=1e-6)
    alone = -target_token_losses(params, cfg, rows[1, 2][None], 4)[0]
    np.testing.assert_allclose(per_token[1, 2], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected \\[batch, documents, seq\\]"):
        retrieved_log_likelihoods(params, cfg, rows[0], 4)
