"""AdamW through optax: warmup + decay schedules, global-norm clipping, and a weight-decay mask
read from the parameter specs (matrices decay; norms, biases and embeddings do not)."""

from __future__ import annotations

import jax
import optax

from llmjax.config import ModelConfig, TrainConfig
from llmjax.model.params import is_spec, path_name
from llmjax.model.transformer import model_spec

EMBEDDING_AXES = {"vocab", "length"}  # token and position embeddings, and the (untied) output embedding


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """step -> learning rate: linear warmup from 0 to cfg.lr, then the chosen decay to lr * min_lr_ratio."""
    floor = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, floor, decay_steps)
    elif cfg.schedule == "wsd":
        cooldown = max(round(cfg.decay_fraction * decay_steps), 1)
        decay = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, floor, cooldown)],
            [decay_steps - cooldown],
        )
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def weight_decay_mask(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """A params-shaped tree of bools: True where weight decay applies.

    Linear-layer kernels decay; norms and biases never do; embeddings (parameters with a `vocab`
    or `length` axis, the untied output layer included) decay only with decay_embeddings.
    """

    def decays(path, spec) -> bool:
        is_embedding = bool(EMBEDDING_AXES & set(spec.axes))
        if is_embedding:
            return train_cfg.decay_embeddings
        return path_name(path).endswith("kernel")

    return jax.tree_util.tree_map_with_path(decays, model_spec(model_cfg), is_leaf=is_spec)


def make_optimizer(model_cfg: ModelConfig, train_cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(train_cfg),
        b1=train_cfg.beta1,
        b2=train_cfg.beta2,
        eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
        mask=weight_decay_mask(model_cfg, train_cfg),
    )
    if train_cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)
