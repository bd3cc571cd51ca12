"""Sampling processors against NumPy references, composed per row; seeds; bad settings."""

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.infer.sampling import SamplingConfig, SamplingError, batch_sampling, choose, token_distribution

VOCAB = 11


def reference_distribution(logits, c: SamplingConfig, seen=(), counts=None):
    """One row by the textbook definitions (HF order)."""
    x = np.array(logits, np.float64)
    for token, value in (c.logit_bias or {}).items():
        x[token] += value
    for token in seen:
        x[token] = x[token] / c.repetition_penalty if x[token] > 0 else x[token] * c.repetition_penalty
    if counts is not None:
        x = x - c.presence_penalty * (counts > 0) - c.frequency_penalty * counts
    x = x / c.temperature
    if c.top_k:
        kth = np.sort(x)[::-1][c.top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    if c.top_p < 1:
        order = np.argsort(-x)
        p = np.exp(x[order] - x[order].max())
        p /= p.sum()
        keep_sorted = (np.cumsum(p) - p) < c.top_p
        keep = np.zeros_like(keep_sorted)
        keep[order] = keep_sorted
        x = np.where(keep, x, -np.inf)
    if c.min_p:
        p = np.exp(x - x.max())
        p /= p.sum()
        x = np.where(p >= c.min_p * p.max(), x, -np.inf)
    p = np.exp(x - x.max())
    return p / p.sum()


CONFIGS = [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.3, top_k=3),
    SamplingConfig(top_p=0.6),
    SamplingConfig(temperature=0.9, min_p=0.2),
    SamplingConfig(top_k=5, top_p=0.8, min_p=0.05, repetition_penalty=1.5, presence_penalty=0.4,
                   frequency_penalty=0.3, logit_bias={2: 3.0, 7: -2.0}),
]


def test_each_row_gets_its_own_processors():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((len(CONFIGS), VOCAB)).astype(np.float32) * 2
    seen = np.zeros((len(CONFIGS), VOCAB), bool)
    seen[:, [1, 2, 9]] = True
    counts = np.zeros((len(CONFIGS), VOCAB), np.int32)
    counts[:, 2], counts[:, 9] = 3, 1
    arrays, features = batch_sampling(CONFIGS, VOCAB, VOCAB)
    got = np.asarray(token_distribution(jnp.asarray(logits), arrays, features, seen=jnp.asarray(seen),
                                        generated_counts=jnp.asarray(counts)))
    for row, config in enumerate(CONFIGS):
        penalized = config.repetition_penalty != 1 or config.presence_penalty or config.frequency_penalty
        want = reference_distribution(logits[row], config, seen=[1, 2, 9] if penalized else (),
                                      counts=counts[row] if penalized else None)
        np.testing.assert_allclose(got[row], want, atol=1e-5, err_msg=str(config))


def test_samples_follow_the_distribution_and_greedy_takes_the_argmax():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((1, VOCAB)), jnp.float32)
    configs = [SamplingConfig(temperature=1.0, top_k=4, seed=s) for s in range(4000)] + [SamplingConfig.greedy()]
    arrays, features = batch_sampling(configs, VOCAB, VOCAB)
    tokens = np.asarray(choose(jnp.repeat(logits, len(configs), 0), arrays, features, 0))
    assert tokens[-1] == int(jnp.argmax(logits))
    frequency = np.bincount(tokens[:-1], minlength=VOCAB) / (len(configs) - 1)
    want = reference_distribution(np.asarray(logits[0]), configs[0])
    assert np.abs(frequency - want).max() < 0.03
    assert (frequency[want == 0] == 0).all()


def test_same_seed_same_token_whatever_the_batch():
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((3, VOCAB)), jnp.float32)
    configs = [SamplingConfig(seed=7), SamplingConfig(seed=8), SamplingConfig(seed=7)]
    arrays, features = batch_sampling(configs, VOCAB, VOCAB)
    tokens = np.asarray(choose(jnp.stack([logits[0], logits[1], logits[0]]), arrays, features, 5))
    assert tokens[0] == tokens[2]
    alone, alone_features = batch_sampling([SamplingConfig(seed=7)], VOCAB, VOCAB)
    assert int(choose(logits[:1], alone, alone_features, 5)[0]) == tokens[0]


def test_allowed_mask_is_respected_before_the_filters():
    logits = jnp.asarray([[5.0, 4.0, 3.0, -1.0, -2.0]])
    allowed = jnp.asarray([[False, False, False, True, True]])
    arrays, features = batch_sampling([SamplingConfig(top_k=1)], 5, 5)
    assert int(choose(logits, arrays, features, 0, allowed=allowed)[0]) == 3


@pytest.mark.parametrize("settings,message", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_bad_settings_are_one_clear_error(settings, message):
    with pytest.raises(SamplingError, match=message):
        SamplingConfig(**settings)


def test_logit_bias_outside_the_vocab():
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        batch_sampling([SamplingConfig(logit_bias={99: 1.0})], VOCAB, 16)
