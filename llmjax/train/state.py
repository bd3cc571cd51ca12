"""The training state: step counter, parameters and optimizer state, and how a fresh one is made.

Its own module, below both the train step (llmjax.train.step) and the sharding plan (llmjax.parallel.plan),
which lays the state out on a mesh: each imports it, neither imports the other for it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from llmjax.config import ModelConfig, TrainConfig
from llmjax.model.transformer import init_params
from llmjax.train.optim import make_optimizer


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: updates applied so far
    params: dict
    opt_state: optax.OptState


def init_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, key: jax.Array) -> TrainState:
    return train_state_from_params(init_params(model_cfg, key), model_cfg, train_cfg)


def train_state_from_params(params: dict, model_cfg: ModelConfig, train_cfg: TrainConfig) -> TrainState:
    """Step 0 and a fresh optimizer state over given parameters (fine-tuning a trained or imported model)."""
    opt_state = make_optimizer(train_cfg, model_cfg=model_cfg).init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state)
