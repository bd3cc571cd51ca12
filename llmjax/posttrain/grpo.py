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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax.config import ModelConfig, TrainConfig
from llmjax.infer.engine import Engine, SamplingParams
from llmjax.model import forward
from llmjax.posttrain.losses import group_advantages, grpo_objective, token_log_probs
from llmjax.posttrain.rollouts import Rollout, completion_rows, sample_groups
from llmjax.train.optim import make_optimizer
from llmjax.train.state import TrainState


@dataclass(frozen=True)
class GRPOConfig:
    """group_size completions per prompt; updates_per_batch optimizer steps on each rollout batch (DeepSeekMath's
    mu); the clipped objective's settings (`llmjax.posttrain.losses.grpo_objective`); normalize_std: divide the
    group-centred rewards by the group's std (False: Dr. GRPO)."""

    group_size: int = 8
    updates_per_batch: int = 2
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    normalize: str = "token"
    normalize_std: bool = True


def policy_log_probs(params: dict, rows: dict, cfg: ModelConfig) -> jax.Array:
    """log pi(target) at every position of the rows ({"inputs", "targets"} [b, t]) -> [b, t] float32."""
    logits = forward(params, rows["inputs"], cfg)  # [b, t, padded_vocab]
    return token_log_probs(logits, rows["targets"], cfg.vocab_size)


def grpo_loss(params: dict, batch: dict, cfg: ModelConfig, config: GRPOConfig) -> tuple[jax.Array, dict]:
    """The clipped GRPO objective of the batch ({"inputs", "targets", "completion_mask", "old_logps", "advantages"})."""
    logps = policy_log_probs(params, batch, cfg)
    return grpo_objective(logps, batch["old_logps"], batch["advantages"], batch["completion_mask"],
                          clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high, normalize=config.normalize)


def grpo_update(state: TrainState, batch: dict, *, cfg: ModelConfig, train_cfg: TrainConfig, config: GRPOConfig
                ) -> tuple[TrainState, dict]:
    """One optimizer step on the batch's GRPO objective (AdamW with the run's schedule and clipping)."""
    optimizer = make_optimizer(train_cfg, model_cfg=cfg)
    (loss, metrics), grads = jax.value_and_grad(grpo_loss, has_aux=True)(state.params, batch, cfg, config)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}


jitted_grpo_update = jax.jit(grpo_update, static_argnames=("cfg", "train_cfg", "config"), donate_argnums=0)
jitted_policy_log_probs = jax.jit(policy_log_probs, static_argnames="cfg")


def grpo_iteration(state: TrainState, engine: Engine, prompts: Sequence[Sequence[int]],
                   reward_of: Callable[[Rollout], float], *, cfg: ModelConfig, train_cfg: TrainConfig,
                   config: GRPOConfig, sampling: SamplingParams, seq_len: int, seed: int) -> tuple[TrainState, dict]:
    """Rollouts of the current policy, their group-relative advantages, then config.updates_per_batch updates.
    Returns the new state and the iteration's metrics: reward_mean / reward_std of the rollouts, completion_length,
    and the last update's objective metrics (loss, clip_fraction, ratio_mean, ...)."""
    engine.update_weights(state.params)
    rollouts = sample_groups(engine, prompts, config.group_size, sampling, seed=seed)
    rewards = np.asarray([float(reward_of(rollout)) for rollout in rollouts], np.float32)  # [prompts * G]
    rows = {key: jnp.asarray(value) for key, value in completion_rows(rollouts, seq_len).items()}
    batch = {**rows, "advantages": group_advantages(jnp.asarray(rewards), config.group_size,
                                                    normalize_std=config.normalize_std),
             "old_logps": jitted_policy_log_probs(state.params, rows, cfg)}
    metrics = {}
    for _ in range(config.updates_per_batch):
        state, metrics = jitted_grpo_update(state, batch, cfg=cfg, train_cfg=train_cfg, config=config)
    lengths = [len(rollout.completion_ids) for rollout in rollouts]
    return state, {**{key: float(value) for key, value in jax.device_get(metrics).items()},
                   "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "completion_length": float(np.mean(lengths))}
