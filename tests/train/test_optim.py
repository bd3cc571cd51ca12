"""Schedules, weight-decay masks, clipping and TrainConfig validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax.config import ConfigError, TrainConfig, get_config
from llmjax.model import init_params
from llmjax.model.params import flatten_with_names
from llmjax.train.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


def lr_at(cfg, step):
    return float(learning_rate_schedule(cfg)(step))


def test_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, total_steps=110, schedule="cosine")
    assert lr_at(cfg, 0) == 0.0
    assert lr_at(cfg, 5) == pytest.approx(5e-4)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    for step in (30, 60, 97):  # cosine from lr to floor over the 100 decay steps
        progress = (step - 10) / 100
        want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_at(cfg, step) == pytest.approx(want, rel=1e-5)
    assert lr_at(cfg, 110) == pytest.approx(1e-4)
    assert lr_at(cfg, 500) == pytest.approx(1e-4)  # stays at the floor past the end


def test_linear_constant_and_wsd_schedules():
    base = dict(lr=2e-3, min_lr_ratio=0.0, warmup_steps=0, total_steps=100)
    linear = TrainConfig(schedule="linear", **base)
    assert lr_at(linear, 0) == pytest.approx(2e-3) and lr_at(linear, 25) == pytest.approx(1.5e-3)
    assert lr_at(TrainConfig(schedule="constant", **base), 77) == pytest.approx(2e-3)
    wsd = TrainConfig(schedule="wsd", decay_fraction=0.2, **base)  # flat for 80 steps, linear to 0 over 20
    assert lr_at(wsd, 79) == pytest.approx(2e-3)
    assert lr_at(wsd, 90) == pytest.approx(1e-3)
    assert lr_at(wsd, 100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_weight_decay_only_on_matrices_not_embeddings(preset):
    cfg = get_config(preset)
    mask = flatten_with_names(weight_decay_mask(cfg, TrainConfig()))
    decayed = {name for name, flag in mask.items() if flag}
    want = {f"blocks/attn/{n}/kernel" for n in "qkvo"} | {"blocks/mlp/up/kernel", "blocks/mlp/down/kernel"}
    if cfg.activation == "swiglu":
        want.add("blocks/mlp/gate/kernel")
    assert decayed == want
    with_embeddings = flatten_with_names(weight_decay_mask(cfg, TrainConfig(decay_embeddings=True)))
    assert with_embeddings["embed/token"] and not with_embeddings["final_norm/scale"]


def test_decay_is_applied_where_masked_and_nowhere_else():
    """With zero gradients AdamW's only change is -lr * wd * param on the masked leaves."""
    cfg = get_config("gpt2-tiny")
    train_cfg = TrainConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip=None)
    params = jax.tree.map(jnp.ones_like, init_params(cfg, jax.random.key(0)))
    optimizer = make_optimizer(cfg, train_cfg)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    mask = flatten_with_names(weight_decay_mask(cfg, train_cfg))
    for name, update in flatten_with_names(updates).items():
        np.testing.assert_allclose(update, -0.05 if mask[name] else 0.0, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("grad_clip,want_norm", [(0.5, 0.5e-3), (None, 5e-3), (10.0, 5e-3)])
def test_clipping_bounds_the_global_norm(grad_clip, want_norm):
    """With eps far above |g|, Adam's first update is -lr * g / eps: proportional to the clipped
    gradient, so its norm shows whether the gradient of norm 5 was clipped."""
    cfg = get_config("gpt2-tiny")
    train_cfg = TrainConfig(lr=1.0, eps=1e3, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=grad_clip)
    params = init_params(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves]
    total = np.sqrt(sum((g**2).sum() for g in grads))
    grads = jax.tree.unflatten(tree, [jnp.asarray(5.0 * g / total) for g in grads])  # global norm 5
    optimizer = make_optimizer(cfg, train_cfg)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(want_norm, rel=1e-3)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(warmup_steps=20, total_steps=10), "warmup_steps=20 exceeds total_steps=10"),
        (dict(schedule="step"), "schedule='step'"),
        (dict(micro_batches=0), "micro_batches=0"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio=2.0"),
        (dict(grad_clip=0.0), "grad_clip=0.0"),
    ],
)
def test_bad_train_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields)
