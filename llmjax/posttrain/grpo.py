"""GRPO (Shao et al. 2024, DeepSeekMath): one iteration samples G completions of every prompt with the serving
engine, scores them, normalizes the rewards within each prompt's group, and takes several clipped policy-gradient
steps on that batch.

    state = train_state_from_params(params, cfg, train_cfg)
    engine = Engine(params, cfg, EngineConfig(...))
    for iteration in range(n):
        state, metrics = grpo_iteration(state, engine, prompts, reward_of, cfg=cfg, train_cfg=train_cfg,
                                        config=GRPOConfig(group_size=8), sampling=SamplingParams(max_tokens=64,
                                        temperature=1.0), seq_len=256, seed=iteration)

The policy's weights go to the engine with `Engine.update_weights` (prepared on their device, no host copy, the
engine's compiled programs kept). The sampling policy's log-probabilities are recomputed with the trainer's forward
before the first update (`old_logps`), so the importance ratio of the first step is exactly 1 and later steps on the
same batch are clipped against it. reward_of(rollout) -> float is any Python callable (`llmjax.posttrain.tasks.score`
turns a misbehaving one into one clear error).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax.config import ModelConfig, TrainConfig
from llmjax.infer.engine import Engine, SamplingParams
from llmjax.model import forward
from llmjax.nn import fp8
from llmjax.posttrain.losses import group_advantages, grpo_objective, token_log_probs
from llmjax.posttrain.rollouts import Rollout, completion_rows, sample_groups
from llmjax.train.optim import make_optimizer
from llmjax.train.state import TrainState


@dataclass(frozen=True)
class GRPOConfig:
    """group_size completions per prompt; updates_per_batch optimizer steps on each rollout batch (DeepSeekMath's
    mu); the clipped objective's settings (`llmjax.posttrain.losses.grpo_objective`); normalize_std: divide the
    group-centred rewards by the group's std (False: Dr. GRPO); kl_coef: weight of the k3 KL penalty to a frozen
    reference policy (DeepSeekMath's beta, 0.04 there; 0: no penalty and no reference forward)."""

    group_size: int = 8
    updates_per_batch: int = 2
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    normalize: str = "token"
    normalize_std: bool = True
    kl_coef: float = 0.0

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO compares the samples of a prompt, so at least 2")
        if self.updates_per_batch < 1:
            raise ValueError(f"updates_per_batch={self.updates_per_batch}: must be at least 1")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef={self.kl_coef}: must be a finite number >= 0")


def policy_log_probs(params: dict, rows: dict, cfg: ModelConfig) -> jax.Array:
    """log pi(target) at every position of the rows ({"inputs", "targets"} [b, t]) -> [b, t] float32."""
    logits = forward(params, rows["inputs"], cfg)  # [b, t, padded_vocab]
    return token_log_probs(logits, rows["targets"], cfg.vocab_size)


def grpo_loss(params: dict, batch: dict, cfg: ModelConfig, config: GRPOConfig) -> tuple[jax.Array, dict]:
    """The clipped GRPO objective of the batch ({"inputs", "targets", "completion_mask", "old_logps", "advantages"},
    and "ref_logps" when config.kl_coef > 0)."""
    logps = policy_log_probs(params, batch, cfg)
    return grpo_objective(logps, batch["old_logps"], batch["advantages"], batch["completion_mask"],
                          clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high, normalize=config.normalize,
                          kl_coef=config.kl_coef, ref_logps=batch.get("ref_logps"))


def grpo_update(state: TrainState, batch: dict, *, cfg: ModelConfig, train_cfg: TrainConfig, config: GRPOConfig
                ) -> tuple[TrainState, dict]:
    """One optimizer step on the batch's GRPO objective (AdamW with the run's schedule and clipping)."""
    optimizer = make_optimizer(train_cfg, model_cfg=cfg)
    (loss, metrics), grads_and_histories = jax.value_and_grad(grpo_loss, has_aux=True)(state.params, batch, cfg,
                                                                                       config)
    grads = fp8.without_histories(grads_and_histories)  # FP8 delayed scaling: histories' gradients are next values
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = fp8.take_new_histories(optax.apply_updates(state.params, updates), grads_and_histories)
    return TrainState(state.step + 1, params, opt_state), {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}


def row_length(rollouts: Sequence[Rollout], seq_len: int, multiple: int = 32) -> int:
    """The training rows' length for this batch: its longest prompt + completion (less the last token, a target
    only) rounded up to a multiple of `multiple`, at most seq_len. Rows as long as the batch needs, not as long as
    max_tokens allows, in a handful of compiled lengths (short completions cost less to train on)."""
    longest = max(len(rollout.prompt_ids) + len(rollout.completion_ids) for rollout in rollouts) - 1
    return min(seq_len, -(-longest // multiple) * multiple)


jitted_grpo_update = jax.jit(grpo_update, static_argnames=("cfg", "train_cfg", "config"), donate_argnums=0)
jitted_policy_log_probs = jax.jit(policy_log_probs, static_argnames="cfg")


def grpo_iteration(state: TrainState, engine: Engine, prompts: Sequence[Sequence[int]],
                   reward_of: Callable[[Rollout], float], *, cfg: ModelConfig, train_cfg: TrainConfig,
                   config: GRPOConfig, sampling: SamplingParams, seq_len: int, seed: int,
                   ref_params: dict | None = None) -> tuple[TrainState, dict]:
    """Rollouts of the current policy, their group-relative advantages, then config.updates_per_batch updates.
    seq_len: the longest a row can be (the longest prompt + sampling.max_tokens); each batch trains on rows cut to
    its own longest rollout (`row_length`). ref_params: the frozen reference policy of the KL penalty (needed when
    config.kl_coef > 0).
    Returns the new state and the iteration's metrics: reward_mean / reward_std of the rollouts, completion_length,
    rollout_seconds and rollout_tokens_per_s (completion tokens over the wall time of sampling them), and the last
    update's objective metrics (loss, clip_fraction, ratio_mean, kl, ...)."""
    if config.kl_coef > 0 and ref_params is None:
        raise ValueError(f"kl_coef={config.kl_coef} needs ref_params, the reference policy's weights")
    engine.update_weights(state.params)
    started = time.perf_counter()
    rollouts = sample_groups(engine, prompts, config.group_size, sampling, seed=seed)
    rollout_seconds = time.perf_counter() - started
    rewards = np.asarray([float(reward_of(rollout)) for rollout in rollouts], np.float32)  # [prompts * G]
    rows = {key: jnp.asarray(value) for key, value in completion_rows(rollouts, row_length(rollouts, seq_len)).items()}
    batch = {**rows, "advantages": group_advantages(jnp.asarray(rewards), config.group_size,
                                                    normalize_std=config.normalize_std),
             "old_logps": jitted_policy_log_probs(state.params, rows, cfg)}
    if config.kl_coef > 0:
        batch["ref_logps"] = jitted_policy_log_probs(ref_params, rows, cfg)
    metrics = {}
    for _ in range(config.updates_per_batch):
        state, metrics = jitted_grpo_update(state, batch, cfg=cfg, train_cfg=train_cfg, config=config)
    lengths = [len(rollout.completion_ids) for rollout in rollouts]
    return state, {**{key: float(value) for key, value in jax.device_get(metrics).items()},
                   "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "completion_length": float(np.mean(lengths)), "rollout_seconds": rollout_seconds,
                   "rollout_tokens_per_s": sum(lengths) / max(rollout_seconds, 1e-9)}
