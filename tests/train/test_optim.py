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
    optimizer = make_optimizer(train_cfg, model_cfg=cfg)
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
    optimizer = make_optimizer(train_cfg, model_cfg=cfg)
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


# --- make_optimizer on a pytree that is not an llmjax model ---------------------------------------------

def own_params(seed=0):
    """A learner's own pytree at awkward sizes: a matrix, a bias, a nested embedding table."""
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
            "nested": {"emb": rng.standard_normal((7, 4)).astype(np.float32)}}


OWN_MASK = {"w": True, "b": False, "nested": {"emb": False}}


def decays_only_w(path, leaf):
    return jax.tree_util.keystr(path) == "['w']"


def numpy_adamw_steps(params, grads_per_step, cfg, mask, learning_rates):
    """float64 reference: clip to the global norm, then Adam with bias correction, decoupled decay, -lr."""
    params = {name: np.asarray(value, np.float64) for name, value in flatten_with_names(params).items()}
    m = {name: np.zeros_like(value) for name, value in params.items()}
    v = {name: np.zeros_like(value) for name, value in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, learning_rates), start=1):
        grads = {name: np.asarray(value, np.float64) for name, value in flatten_with_names(grads).items()}
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        scale = min(1.0, cfg.grad_clip / norm)
        for name, g in grads.items():
            g = g * scale
            m[name] = cfg.beta1 * m[name] + (1 - cfg.beta1) * g
            v[name] = cfg.beta2 * v[name] + (1 - cfg.beta2) * g**2
            m_hat, v_hat = m[name] / (1 - cfg.beta1**t), v[name] / (1 - cfg.beta2**t)
            update = m_hat / (np.sqrt(v_hat) + cfg.eps)
            if mask[name]:
                update = update + cfg.weight_decay * params[name]
            params[name] = params[name] - lr * update
    return params


def run_optimizer(optimizer, params, grads_per_step):
    params = jax.tree.map(jnp.asarray, params)
    state = optimizer.init(params)
    step = jax.jit(optimizer.update)
    for grads in grads_per_step:
        updates, state = step(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
    return params


def random_gradients(steps, seed=1):
    """Gradients of very different global norms, so every step clips by its own factor."""
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda p, scale=scale: (scale * rng.standard_normal(p.shape)).astype(np.float32), own_params())
            for scale in (3.0, 0.05, 40.0)[:steps]]


def test_adamw_on_an_own_pytree_matches_float64_numpy():
    cfg = TrainConfig(lr=0.05, min_lr_ratio=0.2, warmup_steps=0, total_steps=7, schedule="cosine", weight_decay=0.3,
                      beta1=0.8, beta2=0.9, eps=1e-2, grad_clip=0.7)
    grads = random_gradients(3)
    lrs = [0.01 + 0.04 * 0.5 * (1 + math.cos(math.pi * t / 7)) for t in range(3)]
    want = numpy_adamw_steps(own_params(), grads, cfg, flatten_with_names(OWN_MASK), lrs)
    for mask in (OWN_MASK, decays_only_w):
        got = flatten_with_names(run_optimizer(make_optimizer(cfg, weight_decay_mask=mask), own_params(), grads))
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6, err_msg=f"{mask}: {name}")


def test_mask_tree_and_predicate_give_identical_updates():
    cfg = TrainConfig(lr=0.1, warmup_steps=2, total_steps=9, weight_decay=0.5)
    grads = random_gradients(3, seed=4)
    by_tree = run_optimizer(make_optimizer(cfg, weight_decay_mask=OWN_MASK), own_params(2), grads)
    by_predicate = run_optimizer(make_optimizer(cfg, weight_decay_mask=decays_only_w), own_params(2), grads)
    for a, b in zip(jax.tree.leaves(by_tree), jax.tree.leaves(by_predicate), strict=True):
        np.testing.assert_array_equal(a, b)


def test_default_mask_decays_arrays_of_two_or_more_dimensions():
    """Zero gradients: the only change is -lr * wd * param, on w and nested/emb (ndim 2), not on b."""
    cfg = TrainConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip=None)
    params = jax.tree.map(jnp.asarray, own_params())
    optimizer = make_optimizer(cfg)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    for name, update in flatten_with_names(updates).items():
        decayed = name in ("w", "nested/emb")
        want = -0.05 * np.asarray(flatten_with_names(params)[name]) if decayed else 0.0
        np.testing.assert_allclose(update, want, rtol=1e-6, atol=0, err_msg=name)


@pytest.mark.parametrize(
    "mask,message",
    [
        ({"w": True, "b": False, "nested": {"embed": False}}, r"the params have \['nested'\]\['emb'\], which the mask lacks; the mask has \['nested'\]\['embed'\], which "),
        ({"w": True, "b": False}, r"the params have \['nested'\]\['emb'\], which the mask lacks"),
        ({"w": True, "b": False, "nested": {"emb": False}, "x": True}, r"the mask has \['x'\], which the params lack"),
    ],
)
def test_mask_of_another_structure_names_the_first_difference_at_init(mask, message):
    optimizer = make_optimizer(TrainConfig(), weight_decay_mask=mask)
    with pytest.raises(ValueError, match=message):
        optimizer.init(jax.tree.map(jnp.asarray, own_params()))


def test_mask_and_model_config_together_or_the_old_argument_order_are_refused():
    cfg = get_config("gpt2-tiny")
    with pytest.raises(ValueError, match="weight_decay_mask or model_cfg, not both"):
        make_optimizer(TrainConfig(), weight_decay_mask=OWN_MASK, model_cfg=cfg)
    with pytest.raises(TypeError, match=r"make_optimizer\(train_cfg, model_cfg=model_cfg\)"):
        make_optimizer(cfg)
