"""llmjax.posttrain.losses against float64 NumPy references written from the papers' equations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.posttrain.losses import (
    dpo_loss,
    group_advantages,
    grpo_objective,
    mean_log_probs,
    orpo_loss,
    sequence_log_probs,
    simpo_loss,
    token_log_probs,
)

PAIRS = 7  # an awkward number of preference pairs


def jitted(function, **static):
    """function with keyword arguments fixed, jitted: one compiled program runs far faster on the CPU than
    eager op-by-op dispatch (and checks the losses trace)."""
    return jax.jit(functools.partial(function, **static))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def log_softmax_gather(logits, targets):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]


def random_logps(seed, shape=(PAIRS,), scale=20.0):
    """Negative summed log-probs like real answers', float32."""
    return -np.random.default_rng(seed).uniform(0.1, scale, shape).astype(np.float32)


def assert_metrics(metrics, expected, rtol=1e-5, atol=1e-5):
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=rtol, atol=atol, err_msg=name)


# --- token log-probs --------------------------------------------------------------------------------------


def test_token_log_probs_matches_float64_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 5))
    got = jitted(token_log_probs)(jnp.asarray(logits), jnp.asarray(targets))
    assert got.shape == (3, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, log_softmax_gather(logits, targets), rtol=1e-5, atol=1e-6)


def test_token_log_probs_is_stable_for_large_logits():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(2, 4, 9)) * 1e3 + 5e4).astype(np.float32)  # exp would overflow float32
    targets = rng.integers(0, 9, (2, 4))
    got = np.asarray(jitted(token_log_probs)(jnp.asarray(logits), jnp.asarray(targets)))
    assert np.all(np.isfinite(got)) and np.all(got <= 0)
    np.testing.assert_allclose(got, log_softmax_gather(logits, targets), rtol=1e-5, atol=1e-2)


def test_token_log_probs_of_bf16_logits_runs_in_float32():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 3, 13)) * 4, jnp.bfloat16)
    targets = rng.integers(0, 13, (2, 3))
    got = jitted(token_log_probs)(logits, jnp.asarray(targets))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, log_softmax_gather(np.asarray(logits, np.float64), targets), rtol=1e-5, atol=1e-6)


def test_token_log_probs_gives_padded_vocab_no_probability():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 16)).astype(np.float32)
    logits[..., 11:] = 50.0  # padding columns that would win a softmax
    targets = rng.integers(0, 11, (2, 3))
    got = jitted(token_log_probs, vocab_size=11)(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(got, log_softmax_gather(logits[..., :11], targets), rtol=1e-5, atol=1e-6)


def test_token_log_probs_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="targets' shape"):
        token_log_probs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        token_log_probs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3)))


def test_sequence_and_mean_log_probs_count_only_masked_tokens():
    rng = np.random.default_rng(4)
    token_logps = -rng.uniform(0, 5, (3, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    token_logps[0, 4] = -np.inf  # an impossible token outside the answer must not matter
    expected_sum = np.where(mask > 0, token_logps, 0).sum(-1)
    np.testing.assert_allclose(sequence_log_probs(token_logps, mask), expected_sum, rtol=1e-6)
    np.testing.assert_allclose(mean_log_probs(token_logps, mask), expected_sum / np.maximum(mask.sum(-1), 1), rtol=1e-6)
    assert float(mean_log_probs(token_logps, mask)[2]) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        sequence_log_probs(token_logps, mask[:, :5])


# --- preference losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_loss_and_metrics_match_the_paper(label_smoothing):
    beta = 0.3
    pc, pr, rc, rr = (random_logps(seed) for seed in range(4))
    loss, metrics = jitted(dpo_loss, beta=beta, label_smoothing=label_smoothing)(pc, pr, rc, rr)

    pc64, pr64, rc64, rr64 = (x.astype(np.float64) for x in (pc, pr, rc, rr))
    reward_c, reward_r = beta * (pc64 - rc64), beta * (pr64 - rr64)
    z = reward_c - reward_r
    expected = np.mean(-(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert_metrics(metrics, {
        "rewards_chosen": reward_c.mean(), "rewards_rejected": reward_r.mean(), "reward_margin": z.mean(),
        "accuracy": np.mean(reward_c > reward_r), "chosen_logps": pc64.mean(),
        "kl": np.concatenate([pc64 - rc64, pr64 - rr64]).mean(),
    })
    assert 0 < float(metrics["accuracy"]) < 1  # the random pairs test both sides of the comparison


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_gradient_is_the_analytic_one(label_smoothing):
    beta = 0.5
    pc, pr, rc, rr = (random_logps(seed, scale=4.0) for seed in range(4, 8))
    grad_c, grad_r, grad_ref = jax.jit(jax.grad(
        lambda c, r, ref: dpo_loss(c, r, ref, rr, beta=beta, label_smoothing=label_smoothing)[0], argnums=(0, 1, 2)
    ))(pc, pr, rc)
    z = beta * ((pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr))
    d_loss_d_z = (-(1 - label_smoothing) * sigmoid(-z) + label_smoothing * sigmoid(z)) / PAIRS
    np.testing.assert_allclose(grad_c, beta * d_loss_d_z, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_r, -beta * d_loss_d_z, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad_ref, 0.0)  # the reference is a constant


def test_simpo_loss_and_metrics():
    beta, gamma = 2.5, 0.7
    chosen, rejected = random_logps(8, scale=3.0), random_logps(9, scale=3.0)
    loss, metrics = jitted(simpo_loss, beta=beta, gamma=gamma)(chosen, rejected)
    c64, r64 = chosen.astype(np.float64), rejected.astype(np.float64)
    np.testing.assert_allclose(float(loss), np.mean(-log_sigmoid(beta * (c64 - r64) - gamma)), rtol=1e-5)
    assert_metrics(metrics, {
        "rewards_chosen": beta * c64.mean(), "rewards_rejected": beta * r64.mean(),
        "reward_margin": beta * (c64 - r64).mean(), "accuracy": np.mean(c64 > r64), "chosen_logps": c64.mean(),
    })


def test_orpo_loss_and_metrics():
    lam = 0.25
    chosen, rejected = random_logps(10, scale=3.0), random_logps(11, scale=3.0)
    chosen[0] = -1e-4  # near-certain answer: 1 - p must not lose its digits
    nll = -chosen  # the chosen answers' mean NLL per pair
    loss, metrics = jitted(orpo_loss, lam=lam)(chosen, rejected, nll)

    def log_odds(avg):
        p = np.exp(avg.astype(np.float64))
        return np.log(p / (1 - p))

    ratio = log_odds(chosen) - log_odds(rejected)
    expected = np.mean(nll.astype(np.float64)) + lam * np.mean(-log_sigmoid(ratio))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert_metrics(metrics, {
        "log_odds_ratio": ratio.mean(), "accuracy": np.mean(ratio > 0), "nll": nll.astype(np.float64).mean(),
    }, rtol=1e-4)
    loss_scalar_nll, _ = jitted(orpo_loss, lam=lam)(chosen, rejected, jnp.mean(nll))
    np.testing.assert_allclose(float(loss_scalar_nll), expected, rtol=1e-5)
    certain, _ = jitted(orpo_loss)(jnp.zeros(2), jnp.full(2, -1.0), jnp.zeros(2))  # p = 1 keeps finite odds
    assert np.isfinite(float(certain))


def test_preference_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="reference_rejected \\[6\\]"):
        dpo_loss(jnp.zeros(7), jnp.zeros(7), jnp.zeros(7), jnp.zeros(6))
    with pytest.raises(ValueError, match="same shape"):
        simpo_loss(jnp.zeros(7), jnp.zeros(5))
    with pytest.raises(ValueError, match="chosen_nll"):
        orpo_loss(jnp.zeros(7), jnp.zeros(7), jnp.zeros(3))


# --- GRPO -------------------------------------------------------------------------------------------------


def tiny_policy(seed, answers=4, seq=5, vocab=7):
    """Random logits [answers, seq, vocab], sampled tokens, a ragged mask and advantages."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(answers, seq, vocab)).astype(np.float32)
    tokens = rng.integers(0, vocab, (answers, seq))
    mask = np.ones((answers, seq), np.int32)
    mask[0, 3:] = 0
    mask[1, :2] = 0
    mask[2, 1] = 0
    advantages = rng.normal(size=answers).astype(np.float32)
    return logits, tokens, mask, advantages


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_grpo_without_clipping_is_reinforce_with_baseline(normalize):
    logits, tokens, mask, advantages = tiny_policy(12)

    def loss(logits_param):
        logps = token_log_probs(logits_param, tokens)
        return grpo_objective(logps, logps, advantages, mask, normalize=normalize)[0]  # old == new: ratio 1

    value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(logits))

    # REINFORCE with the group baseline: -sum over answer tokens of weight * A * grad log pi(token).
    if normalize == "token":
        weights = mask / mask.sum()
    else:
        weights = mask / (np.maximum(mask.sum(1, keepdims=True), 1) * mask.shape[0])
    weights = weights * advantages.astype(np.float64)[:, None]  # [answers, seq]
    logits64 = logits.astype(np.float64)
    probs = np.exp(logits64 - logits64.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    grad_log_pi = np.eye(logits.shape[-1])[tokens] - probs  # d log softmax(z)[token] / dz
    np.testing.assert_allclose(grad, -weights[..., None] * grad_log_pi, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(value), -weights.sum(), rtol=1e-5, atol=1e-7)


def ratios_on_both_sides():
    """Ratios [2, 6] on both sides of [0.8, 1.2]; advantage +1 for answer 0, -1 for answer 1."""
    ratio = np.array([[0.5, 0.9, 1.0, 1.1, 1.3, 2.0]] * 2, np.float32)
    return np.log(ratio), np.zeros_like(ratio), np.array([1.0, -1.0], np.float32), np.ones(ratio.shape)


@pytest.mark.parametrize("clip_eps_high, binding", [
    (None, [(0, 4), (0, 5), (1, 0)]),  # A > 0 binds above 1.2, A < 0 below 0.8
    (0.5, [(0, 5), (1, 0)]),  # clip higher: A > 0 binds above 1.5 only
])
def test_grpo_clip_stops_the_gradient_exactly_where_it_binds(clip_eps_high, binding):
    logps, old_logps, advantages, mask = ratios_on_both_sides()
    grad_fn = jax.jit(jax.grad(functools.partial(grpo_objective, clip_eps=0.2, clip_eps_high=clip_eps_high), has_aux=True))
    grad, metrics = grad_fn(jnp.asarray(logps), old_logps, advantages, mask)
    grad = np.asarray(grad)
    expected = -advantages[:, None] * np.exp(logps) / mask.sum()  # d(-ratio * A / N) / d logp
    for answer, token in binding:
        expected[answer, token] = 0.0
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=0)
    assert np.count_nonzero(grad) == grad.size - len(binding)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), len(binding) / mask.size, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), np.exp(logps).mean(), rtol=1e-6)


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_grpo_ignores_positions_outside_the_mask(normalize):
    logits, tokens, mask, advantages = tiny_policy(13)
    rng = np.random.default_rng(14)
    logps = np.asarray(jitted(token_log_probs)(jnp.asarray(logits), jnp.asarray(tokens)))
    old_logps = logps + rng.normal(scale=0.3, size=logps.shape).astype(np.float32)
    ref_logps = logps + rng.normal(scale=0.3, size=logps.shape).astype(np.float32)

    def loss_and_grad(logps, old_logps, ref_logps):
        return jax.jit(jax.value_and_grad(lambda lp: grpo_objective(
            lp, old_logps, advantages, mask, kl_coef=0.1, ref_logps=ref_logps, normalize=normalize)[0]))(logps)

    value, grad = loss_and_grad(logps, old_logps, ref_logps)
    outside = mask == 0
    value_changed, grad_changed = loss_and_grad(  # anything, even inf and NaN, outside the answers
        np.where(outside, np.inf, logps), np.where(outside, -np.inf, old_logps), np.where(outside, np.nan, ref_logps))
    assert float(value) == float(value_changed)
    np.testing.assert_array_equal(grad, grad_changed)
    assert np.all(np.asarray(grad)[outside] == 0)


def test_grpo_kl_penalty_is_zero_at_the_reference_and_pulls_towards_it():
    logits, tokens, mask, advantages = tiny_policy(15)
    logps = jitted(token_log_probs)(jnp.asarray(logits), jnp.asarray(tokens))
    plain, _ = jitted(grpo_objective)(logps, logps, advantages, mask)
    at_reference, metrics = jitted(grpo_objective, kl_coef=0.5)(logps, logps, advantages, mask, ref_logps=logps)
    assert float(metrics["kl"]) == 0.0 and float(at_reference) == float(plain)

    ref_logps = logps + jnp.asarray(np.random.default_rng(16).normal(scale=0.5, size=logps.shape), jnp.float32)
    no_advantage = np.zeros_like(advantages)  # leaves only the KL term's gradient
    kl_coef = 0.5
    (penalized, metrics), grad = jax.jit(jax.value_and_grad(jitted(grpo_objective, kl_coef=kl_coef), has_aux=True))(
        logps, logps, no_advantage, mask, ref_logps=ref_logps)
    assert float(metrics["kl"]) > 0 and float(penalized) > 0
    difference = np.asarray(logps - ref_logps, np.float64)
    expected = kl_coef * (1 - np.exp(-difference)) * mask / mask.sum()  # d k3 / d logp = 1 - exp(ref - logp)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)
    answer_tokens = mask > 0
    assert np.all(np.sign(np.asarray(grad))[answer_tokens] == np.sign(difference)[answer_tokens])


def test_grpo_is_jittable_and_rejects_bad_arguments():
    logits, tokens, mask, advantages = tiny_policy(17)
    logps = jitted(token_log_probs)(jnp.asarray(logits), jnp.asarray(tokens))
    np.testing.assert_allclose(
        jax.jit(grpo_objective, static_argnames=("normalize",))(logps, logps, advantages, mask, normalize="sequence")[0],
        grpo_objective(logps, logps, advantages, mask, normalize="sequence")[0], rtol=1e-6)
    with pytest.raises(ValueError, match="normalize must be"):
        grpo_objective(logps, logps, advantages, mask, normalize="batch")
    with pytest.raises(ValueError, match="same shape"):
        grpo_objective(logps, logps[:, :-1], advantages, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_objective(logps, logps, advantages[:-1], mask)
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_objective(logps, logps, advantages, mask, kl_coef=0.1)


def test_group_advantages():
    rng = np.random.default_rng(18)
    group_size = 5
    rewards = rng.normal(size=3 * group_size).astype(np.float32)
    grouped = jitted(group_advantages, group_size=group_size)(rewards).reshape(3, group_size)
    np.testing.assert_allclose(np.asarray(grouped).mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grouped).std(1, ddof=1), 1, rtol=1e-4)
    centered = jitted(group_advantages, group_size=group_size, normalize_std=False)(rewards).reshape(3, group_size)
    expected = rewards.reshape(3, group_size) - rewards.reshape(3, group_size).mean(1, keepdims=True)
    np.testing.assert_allclose(centered, expected, rtol=1e-5, atol=1e-6)

    equal = jitted(group_advantages, group_size=3)(jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(equal[:3], 0.0)
    assert np.all(np.isfinite(np.asarray(equal)))
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        group_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="prompts \\* group_size"):
        group_advantages(jnp.ones(7), 3)
