"""The losses of post-training, as pure jax.numpy functions on log-probabilities (jit-able, float32 math).

Log-probabilities of answers
    `token_log_probs` turns the model's logits [batch, seq, vocab] and the answer's tokens into
    log p(token) per position; `sequence_log_probs` sums them over an answer's tokens (the mask) and
    `mean_log_probs` averages them (the length-normalized score of SimPO and ORPO).

Preference optimization on pairs (chosen y_w, rejected y_l) of answers to one prompt
    DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model"): with the implicit reward r(y) = beta * (log pi(y) - log pi_ref(y)),
        loss = -log sigmoid(r(y_w) - r(y_l)),
    and with label smoothing ls (the conservative DPO form TRL uses: labels flipped with probability ls)
        loss = -(1 - ls) log sigmoid(z) - ls log sigmoid(-z),  z = r(y_w) - r(y_l).
    SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"): the
    reward is the length-averaged log-probability, no reference model, and a target margin gamma:
        loss = -log sigmoid(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma).
    ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"): the
    chosen answer's NLL plus an odds-ratio term, with odds(y) = p / (1 - p) and p = exp(avg log pi(y)):
        loss = NLL(y_w) - lam * log sigmoid(log odds(y_w) - log odds(y_l)).

RL with verifiable rewards
    GRPO (Shao et al. 2024, "DeepSeekMath"; as Stanford CS336 assignment 5 writes it): G answers are
    sampled per prompt; an answer's advantage is its reward against its group's,
        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)   (Dr. GRPO drops the std),
    and the policy maximizes PPO's clipped surrogate per token, with ratio = pi / pi_old,
        min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) - kl_coef * KL_k3(pi || pi_ref),
    where KL_k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 is Schulman's unbiased,
    non-negative estimator; averaged over tokens ("token") or per answer and then over answers ("sequence").

Every loss returns (scalar loss, metrics dict of scalars). Log-probabilities of the reference and the
sampling (old) policy are constants: their gradients are stopped here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.nn import token_cross_entropy


def _float32(x: jax.Array) -> jax.Array:
    """x as float32 at least (float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _shape(x) -> str:
    return "[" + ", ".join(map(str, jnp.shape(x))) + "]"


def _check_same_shape(function: str, **arrays) -> None:
    """All arrays must have one shape; the error names each argument and its shape."""
    shapes = {name: jnp.shape(x) for name, x in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {_shape(x)}" for name, x in arrays.items())
        raise ValueError(f"{function}: arguments must have the same shape, got {listed}")


def _counted(mask: jax.Array) -> jax.Array:
    """A mask (bool or numbers) as float32 1 where the token counts (nonzero), 0 elsewhere."""
    return (jnp.asarray(mask) != 0).astype(jnp.float32)


# --- log-probabilities of answers ----------------------------------------------------------------------------


def token_log_probs(logits: jax.Array, targets: jax.Array, vocab_size: int | None = None) -> jax.Array:
    """log p(target) per position: logits [batch, seq, padded_vocab] (any float dtype), targets [batch, seq]
    integers -> [batch, seq] float32 (float64 for float64 logits), a stable log-softmax gathered at targets.

    vocab_size: columns at or past it (the padding of a padded vocabulary) get no probability, as in the
    training loss; `llmjax.model.forward` already puts them at the lowest float.
    """
    if jnp.ndim(logits) < 1 or jnp.shape(logits)[:-1] != jnp.shape(targets):
        raise ValueError(
            f"token_log_probs: logits {_shape(logits)} must be targets' shape {_shape(targets)} plus a vocab axis"
        )
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise TypeError(f"token_log_probs: targets must be integer token ids, got {jnp.result_type(targets)}")
    logits = _float32(logits)  # [batch, seq, padded_vocab]
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    nll, _ = token_cross_entropy(logits, targets)  # [batch, seq]
    return -nll


def sequence_log_probs(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """[batch, seq] per-token log-probs, mask [batch, seq] (nonzero where the token is the answer's) ->
    [batch] summed log p(answer). Masked-out positions count for nothing, even if they hold inf or NaN."""
    _check_same_shape("sequence_log_probs", token_logps=token_logps, mask=mask)
    counted = _counted(mask)
    return jnp.sum(jnp.where(counted > 0, _float32(token_logps), 0.0), axis=-1)


def mean_log_probs(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """[batch, seq], mask [batch, seq] -> [batch] log p(answer) / answer length (0 for an empty answer)."""
    count = jnp.sum(_counted(mask), axis=-1)  # [batch]
    return sequence_log_probs(token_logps, mask) / jnp.maximum(count, 1.0)


# --- preference optimization -------------------------------------------------------------------------------


def _pair_metrics(reward_chosen: jax.Array, reward_rejected: jax.Array, chosen_logps: jax.Array) -> dict:
    """Per-pair rewards [pairs] -> the metrics every preference loss reports."""
    return {
        "rewards_chosen": jnp.mean(reward_chosen),
        "rewards_rejected": jnp.mean(reward_rejected),
        "reward_margin": jnp.mean(reward_chosen - reward_rejected),
        "accuracy": jnp.mean((reward_chosen > reward_rejected).astype(jnp.float32)),
        "chosen_logps": jnp.mean(chosen_logps),  # a collapse of the chosen answers' log-probs shows here
    }


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict]:
    """DPO on summed answer log-probs, each [pairs] -> (mean loss over pairs, metrics).

    beta: the strength of the implicit KL constraint to the reference. label_smoothing: the probability
    that a pair's preference label is wrong (conservative DPO), 0 for plain DPO.
    Metrics: rewards_chosen / rewards_rejected (beta * log-ratio, means), reward_margin, accuracy (the
    fraction of pairs whose chosen reward is higher), chosen_logps (mean policy log p(chosen)) and kl: the
    mean sequence-level log-ratio log pi(y) - log pi_ref(y) over the chosen and rejected answers, an
    estimate of KL(policy || reference) on the data's answers (not on the policy's own samples).
    """
    _check_same_shape("dpo_loss", policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                      reference_chosen=reference_chosen, reference_rejected=reference_rejected)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    policy_chosen, policy_rejected = _float32(policy_chosen), _float32(policy_rejected)
    reference_chosen = jax.lax.stop_gradient(_float32(reference_chosen))
    reference_rejected = jax.lax.stop_gradient(_float32(reference_rejected))
    log_ratio_chosen = policy_chosen - reference_chosen  # [pairs]
    log_ratio_rejected = policy_rejected - reference_rejected  # [pairs]
    logits = beta * (log_ratio_chosen - log_ratio_rejected)  # [pairs]
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
    metrics = _pair_metrics(beta * log_ratio_chosen, beta * log_ratio_rejected, policy_chosen)
    metrics["kl"] = 0.5 * (jnp.mean(log_ratio_chosen) + jnp.mean(log_ratio_rejected))
    return jnp.mean(losses), metrics


def simpo_loss(
    policy_chosen_avg: jax.Array, policy_rejected_avg: jax.Array, beta: float = 2.0, gamma: float = 1.0
) -> tuple[jax.Array, dict]:
    """SimPO on length-averaged answer log-probs (`mean_log_probs`), each [pairs] -> (mean loss, metrics).

    beta scales the reward beta * avg log pi(y); gamma is the target reward margin. No reference model.
    Metrics: rewards_chosen / rewards_rejected, reward_margin, accuracy, chosen_logps (mean avg log-prob).
    """
    _check_same_shape("simpo_loss", policy_chosen_avg=policy_chosen_avg, policy_rejected_avg=policy_rejected_avg)
    chosen, rejected = _float32(policy_chosen_avg), _float32(policy_rejected_avg)  # [pairs]
    losses = -jax.nn.log_sigmoid(beta * (chosen - rejected) - gamma)
    return jnp.mean(losses), _pair_metrics(beta * chosen, beta * rejected, chosen)


def log_odds(avg_logps: jax.Array) -> jax.Array:
    """log(p / (1 - p)) for p = exp(avg_logps) (avg_logps [...] <= 0): avg - log(1 - exp(avg)), with
    1 - exp(avg) as -expm1(avg) so it stays accurate near p = 1. Log-probs are capped one float32 epsilon
    below 0 so a certain answer (p = 1) has large, finite odds."""
    avg_logps = jnp.minimum(_float32(avg_logps), -jnp.finfo(jnp.float32).eps)
    return avg_logps - jnp.log(-jnp.expm1(avg_logps))


def orpo_loss(
    chosen_avg: jax.Array, rejected_avg: jax.Array, chosen_nll: jax.Array, lam: float = 0.1
) -> tuple[jax.Array, dict]:
    """ORPO: chosen_avg, rejected_avg [pairs] length-averaged answer log-probs; chosen_nll [pairs] (or a
    scalar) the supervised NLL of the chosen answers -> (mean over pairs of NLL + lam * odds-ratio loss,
    metrics: log_odds_ratio, accuracy (log odds ratio > 0), nll, odds_ratio_loss, chosen_logps).
    """
    _check_same_shape("orpo_loss", chosen_avg=chosen_avg, rejected_avg=rejected_avg)
    if jnp.ndim(chosen_nll) != 0 and jnp.shape(chosen_nll) != jnp.shape(chosen_avg):
        raise ValueError(
            f"orpo_loss: chosen_nll {_shape(chosen_nll)} must be a scalar or chosen_avg's shape {_shape(chosen_avg)}"
        )
    log_odds_ratio = log_odds(chosen_avg) - log_odds(rejected_avg)  # [pairs]
    odds_ratio_losses = -jax.nn.log_sigmoid(log_odds_ratio)  # [pairs]
    nll = jnp.mean(_float32(chosen_nll))
    metrics = {
        "log_odds_ratio": jnp.mean(log_odds_ratio),
        "accuracy": jnp.mean((log_odds_ratio > 0).astype(jnp.float32)),
        "nll": nll,
        "odds_ratio_loss": jnp.mean(odds_ratio_losses),
        "chosen_logps": jnp.mean(_float32(chosen_avg)),
    }
    return nll + lam * jnp.mean(odds_ratio_losses), metrics


# --- GRPO --------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: jax.Array, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> jax.Array:
    """rewards [prompts * group_size], ordered group by group -> advantages [prompts * group_size] float32:
    reward minus its group's mean, divided by (the group's std + eps) when normalize_std (GRPO; Dr. GRPO
    turns it off). The std is the sample (n - 1) one, as torch.std computes it in TRL and CS336. A group
    whose rewards are all equal gets advantages 0 (no signal), not NaN.
    """
    if group_size < 2:
        raise ValueError(
            f"group_advantages: group_size must be at least 2, got {group_size}; with one answer per prompt "
            "its advantage against the group is always 0 and there is nothing to learn (sample more answers "
            "per prompt)"
        )
    if jnp.ndim(rewards) != 1 or jnp.shape(rewards)[0] % group_size:
        raise ValueError(
            f"group_advantages: rewards must be [prompts * group_size] with group_size {group_size}, "
            f"got shape {_shape(rewards)}"
        )
    grouped = _float32(rewards).reshape(-1, group_size)  # [prompts, group_size]
    advantages = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if normalize_std:
        advantages = advantages / (jnp.std(grouped, axis=1, ddof=1, keepdims=True) + eps)
    return advantages.reshape(-1)


def kl_k3(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token, from log pi and log pi_ref of tokens sampled
    from pi: exp(d) - d - 1 with d = log pi_ref - log pi; non-negative, 0 where the two agree."""
    log_ratio = ref_logps - logps
    return jnp.exp(log_ratio) - log_ratio - 1.0


def _masked_mean(values: jax.Array, counted: jax.Array) -> jax.Array:
    """Mean of values over the positions where counted is 1 (0 when none are)."""
    return jnp.sum(values * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def grpo_objective(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    ref_logps: jax.Array | None = None,
    normalize: str = "token",
    clip_eps_high: float | None = None,
) -> tuple[jax.Array, dict]:
    """GRPO's clipped surrogate loss (to minimize) and its metrics.

    logps, old_logps [answers, seq]: log-probs of the sampled tokens under the policy being trained and
    the one that sampled them; advantages [answers] (`group_advantages`); mask [answers, seq], nonzero at
    answer tokens; ref_logps [answers, seq] for the KL penalty (needed when kl_coef > 0).
    clip_eps: the ratio's lower clip 1 - clip_eps; clip_eps_high: its upper clip 1 + clip_eps_high
    (DAPO's "clip higher"; clip_eps when None).
    normalize: "token" averages over every answer token of the batch (long answers weigh more);
    "sequence" averages over each answer's tokens, then over answers (GRPO's paper; an empty answer counts 0).
    Metrics: clip_fraction (answer tokens where the clipped term was the smaller, so no gradient),
    ratio_mean, kl (mean k3 over answer tokens, 0 without ref_logps), advantage_mean.
    Positions outside the mask contribute neither value nor gradient, whatever they hold.
    """
    if normalize not in ("token", "sequence"):
        raise ValueError(f"grpo_objective: normalize must be 'token' or 'sequence', got {normalize!r}")
    arrays = {"logps": logps, "old_logps": old_logps, "mask": mask}
    if ref_logps is not None:
        arrays["ref_logps"] = ref_logps
    _check_same_shape("grpo_objective", **arrays)
    if jnp.ndim(logps) != 2 or jnp.shape(advantages) != jnp.shape(logps)[:1]:
        raise ValueError(
            f"grpo_objective: logps must be [answers, seq] and advantages [answers], got logps {_shape(logps)} "
            f"and advantages {_shape(advantages)}"
        )
    if ref_logps is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
        raise ValueError(f"grpo_objective: kl_coef={kl_coef} needs ref_logps (the reference policy's log-probs)")
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    counted = _counted(mask)  # [answers, seq]
    answer_token = counted > 0

    def constant_at_answer_tokens(x):  # masked-out positions read 0: no inf or NaN reaches a gradient
        return jnp.where(answer_token, _float32(x), 0.0)

    logps = constant_at_answer_tokens(logps)
    old_logps = jax.lax.stop_gradient(constant_at_answer_tokens(old_logps))
    advantages = jax.lax.stop_gradient(_float32(advantages))[:, None]  # [answers, 1]

    ratio = jnp.exp(logps - old_logps)  # [answers, seq]
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high) * advantages
    clipped_is_smaller = clipped < unclipped  # where the clip binds and the gradient stops
    surrogate = jnp.where(clipped_is_smaller, clipped, unclipped)  # [answers, seq]

    if ref_logps is not None:
        kl = kl_k3(logps, jax.lax.stop_gradient(constant_at_answer_tokens(ref_logps)))  # [answers, seq]
    else:
        kl = jnp.zeros_like(logps)
    per_token = (surrogate - kl_coef * kl) * counted  # [answers, seq]

    if normalize == "token":
        objective = jnp.sum(per_token) / jnp.maximum(jnp.sum(counted), 1.0)
    else:
        per_answer = jnp.sum(per_token, axis=1) / jnp.maximum(jnp.sum(counted, axis=1), 1.0)  # [answers]
        objective = jnp.mean(per_answer)

    metrics = {
        "clip_fraction": _masked_mean(clipped_is_smaller.astype(jnp.float32), counted),
        "ratio_mean": _masked_mean(ratio, counted),
        "kl": _masked_mean(kl, counted),
        "advantage_mean": jnp.mean(advantages),
    }
    return -objective, jax.tree.map(jax.lax.stop_gradient, metrics)
