"""Training LoRA adapters: the base params are a constant of the loss, the optimizer sees only the adapters.

`LoraState(step, adapters, opt_state)` is all that changes (and all that a checkpoint holds besides a
reference to the base run): AdamW's two moments exist for the adapters alone, so the optimizer state is
2 x the adapter parameter count, not 2 x the model's. The loss is the training path's own chunked
cross-entropy (llmjax.train.step) over the adapted model's hidden states (llmjax.peft.lora).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from llmjax.config import ModelConfig, TrainConfig
from llmjax.model.transformer import output_embedding
from llmjax.peft.lora import (
    LoraConfig,
    check_adapters,
    init_adapters,
    lora_hidden_states,
)
from llmjax.quant.model import top_level_params
from llmjax.train.optim import learning_rate_schedule, make_optimizer
from llmjax.train.step import chunked_cross_entropy


class LoraState(NamedTuple):
    step: jax.Array  # int32 scalar
    adapters: dict
    opt_state: optax.OptState


def decays_every_adapter(path, leaf) -> bool:
    """The LoRA weight-decay predicate: every adapter array decays (they are all low-rank factors)."""
    return True


def make_lora_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    """The training optimizer (clipping + AdamW with the run's schedule) over the adapters only."""
    return make_optimizer(train_cfg, weight_decay_mask=decays_every_adapter)


def init_lora_state(params: dict, cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig,
                    key: jax.Array) -> LoraState:
    adapters = init_adapters(params, cfg, lora_cfg, key)
    return LoraState(jnp.zeros((), jnp.int32), adapters, make_lora_optimizer(train_cfg).init(adapters))


def lora_loss_sums(adapters: dict, params: dict, batch: dict, cfg: ModelConfig, lora_cfg: LoraConfig,
                   train_cfg: TrainConfig, rng=None, remat: str | None = None):
    """(summed nll, {"nll_sum", "tokens"}) of the adapted model; no gradient reaches `params`."""
    params = jax.lax.stop_gradient(params)
    x = lora_hidden_states(params, adapters, batch["inputs"], cfg, lora_cfg, rng=rng, remat=remat,
                           positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    embedding = output_embedding(top_level_params(params, cfg), cfg).astype(x.dtype)
    nll, _ = chunked_cross_entropy(x, embedding, batch["targets"], cfg.vocab_size, train_cfg.loss_chunk_tokens)
    mask = batch.get("loss_mask")
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    sums = {"nll_sum": (nll * mask).sum(), "tokens": mask.sum()}
    return sums["nll_sum"], sums


def lora_train_step(state: LoraState, params: dict, batch: dict, rng: jax.Array, *, cfg: ModelConfig,
                    lora_cfg: LoraConfig, train_cfg: TrainConfig, remat: str | None = None):
    """One AdamW update of the adapters on the token-mean loss -> (state, metrics)."""
    grad_fn = jax.grad(lora_loss_sums, has_aux=True)
    grads, sums = grad_fn(state.adapters, params, batch, cfg, lora_cfg, train_cfg,
                          jax.random.fold_in(rng, state.step), remat)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = make_lora_optimizer(train_cfg).update(grads, state.opt_state, state.adapters)
    adapters = optax.apply_updates(state.adapters, updates)
    metrics = {"loss": sums["nll_sum"] / tokens, "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate_schedule(train_cfg)(state.step)}
    return LoraState(state.step + 1, adapters, opt_state), metrics


@functools.cache  # one jitted function per settings: a run resumed in the same process reuses its compiled step
def make_lora_train_step(cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig, remat: str | None = None):
    """jit(lora_train_step) with the configs bound and the state donated: (state, params, batch, rng)."""
    return jax.jit(functools.partial(lora_train_step, cfg=cfg, lora_cfg=lora_cfg, train_cfg=train_cfg, remat=remat),
                   donate_argnums=0)


def make_lora_eval_loss(cfg: ModelConfig, lora_cfg: LoraConfig, train_cfg: TrainConfig):
    """jit((adapters, params, batch) -> mean nll), no dropout."""
    def loss(adapters, params, batch):
        total, sums = lora_loss_sums(adapters, params, batch, cfg, lora_cfg, train_cfg)
        return total / jnp.maximum(sums["tokens"], 1.0)

    return jax.jit(loss)


__all__ = ["LoraState", "check_adapters", "init_lora_state", "lora_loss_sums", "lora_train_step",
           "make_lora_eval_loss", "make_lora_optimizer", "make_lora_train_step"]
