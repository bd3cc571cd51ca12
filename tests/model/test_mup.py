"""µP (llmjax.model.mup) against the table of Tensor Programs V (Adam): init and learning-rate multipliers by
parameter kind, the standard parametrization at the base width, q.k / head_dim attention, and the errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, TrainConfig, get_config
from llmjax.model import init_params
from llmjax.model.attention import project_qkv
from llmjax.model.mup import mup_base_config, parameter_kinds, width_multiplier
from llmjax.model.params import path_name
from llmjax.model.transformer import forward, model_spec, mup_multipliers
from llmjax.train.optim import make_optimizer

# llama-style, untied: width 96 = 4 x the base 24 (heads 12 of head_dim 8, kv heads 4, d_ff 224)
WIDE = get_config("llama-tiny", d_model=96, num_heads=12, num_kv_heads=4, d_ff=224, mup_base_width=24)


STANDARD = dataclasses.replace(WIDE, mup_base_width=0)


def kinds_of(cfg) -> dict:
    return parameter_kinds(model_spec(cfg), model_spec(mup_base_config(cfg)))


def init_multipliers(cfg) -> dict:
    return mup_multipliers(cfg, "init")


def learning_rate_multipliers(cfg) -> dict:
    return mup_multipliers(cfg, "lr")


def flat(tree) -> dict:
    return {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def inits():
    """The µP and the standard model's parameters from the same key (compiled once for the module)."""
    key = jax.random.key(0)
    return init_params(WIDE, key), init_params(STANDARD, key)


def test_parameter_kinds_and_multipliers_follow_the_papers_table():
    assert width_multiplier(WIDE) == 4.0
    base = mup_base_config(WIDE)
    assert (base.d_model, base.num_heads, base.num_kv_heads, base.head_dim, base.d_ff) == (24, 3, 1, 8, 56)
    kinds = kinds_of(WIDE)
    for name in ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel", "attn/o/kernel", "mlp/up/kernel",
                 "mlp/gate/kernel", "mlp/down/kernel"):
        assert kinds[f"blocks/{name}"] == "hidden", name
    assert kinds["lm_head/kernel"] == "output"
    assert kinds["embed/token"] == "vector" and kinds["final_norm/scale"] == "vector"
    assert kinds["blocks/attn_norm/scale"] == "vector"
    init, lr = flat(init_multipliers(WIDE)), flat(learning_rate_multipliers(WIDE))
    expected = {"hidden": (0.5, 0.25), "output": (0.25, 0.25), "vector": (1.0, 1.0)}  # (m^-1/2 | m^-1, m^-1)
    for name, kind in kinds.items():
        assert (init[name], lr[name]) == expected[kind], name


def test_biases_moe_routers_and_experts():
    gpt2 = get_config("gpt2-tiny", d_model=96, num_heads=8, d_ff=384, tie_embeddings=False, mup_base_width=48)
    kinds = kinds_of(gpt2)
    assert kinds["blocks/attn/q/bias"] == "vector" and kinds["blocks/mlp/up/bias"] == "vector"
    assert kinds["embed/position"] == "vector" and kinds["blocks/attn/q/kernel"] == "hidden"
    moe = get_config("llama-tiny", d_model=96, num_heads=12, num_kv_heads=4, d_ff=224, num_experts=4,
                     mup_base_width=24)
    kinds = kinds_of(moe)
    assert kinds["moe_blocks/moe/router/kernel"] == "output"
    assert kinds["moe_blocks/moe/experts/up/kernel"] == "hidden"


def test_at_the_base_width_the_parameters_are_the_standard_ones():
    """Every multiplier is 1 (so the init, which is the standard one times them, below, is the standard one)."""
    at_base = dataclasses.replace(WIDE, mup_base_width=WIDE.d_model)
    assert set(jax.tree.leaves(init_multipliers(at_base))) == {1.0}
    assert set(jax.tree.leaves(learning_rate_multipliers(at_base))) == {1.0}


def test_init_is_the_standard_init_times_the_multipliers(inits):
    mup, standard = flat(inits[0]), flat(inits[1])
    factors = flat(init_multipliers(WIDE))
    for name, value in mup.items():
        np.testing.assert_allclose(value, standard[name] * factors[name], rtol=1e-6, err_msg=name)
    hidden = np.asarray(mup["blocks/attn/q/kernel"])  # std 0.02 / sqrt(4)
    assert abs(hidden.std() / (0.02 / 2) - 1) < 0.05


def test_adam_updates_are_scaled_per_parameter(inits):
    params = inits[0]
    rng = np.random.default_rng(2)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    train = TrainConfig(lr=1e-3, warmup_steps=0, weight_decay=0.1, grad_clip=None)

    def step(cfg):
        optimizer = make_optimizer(train, model_cfg=cfg)
        return flat(jax.jit(lambda g, p: optimizer.update(g, optimizer.init(p), p)[0])(grads, params))

    mup, standard = step(WIDE), step(STANDARD)
    factors = flat(learning_rate_multipliers(WIDE))
    for name in mup:
        np.testing.assert_allclose(mup[name], standard[name] * factors[name], rtol=1e-5, atol=1e-12, err_msg=name)
    assert factors["blocks/mlp/up/kernel"] == 0.25 and factors["embed/token"] == 1.0


def test_attention_logits_are_divided_by_head_dim(inits):
    """µP's forward equals the standard forward with the query kernel times 1 / sqrt(head_dim): every attention path
    (training, decoding) goes through project_qkv, where the factor is applied."""
    cfg = dataclasses.replace(WIDE, compute_dtype="float32")
    params = inits[0]
    x = jax.random.normal(jax.random.key(5), (2, 5, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    layer = jax.tree.map(lambda p: p[0], params["blocks"]["attn"])
    standard_cfg = dataclasses.replace(cfg, mup_base_width=0)
    q_mup = project_qkv(layer, x, positions, cfg)[0]
    q_sp = project_qkv(layer, x, positions, standard_cfg)[0]
    np.testing.assert_allclose(q_mup, q_sp * cfg.head_dim ** -0.5, rtol=1e-5, atol=1e-7)
    tokens = jax.random.randint(jax.random.key(6), (2, 7), 0, cfg.vocab_size)
    scaled = jax.tree.map(lambda p: p, params)
    scaled["blocks"]["attn"]["q"]["kernel"] = params["blocks"]["attn"]["q"]["kernel"] * cfg.head_dim ** -0.5
    logits = jax.jit(forward, static_argnums=2)
    np.testing.assert_allclose(logits(params, tokens, cfg), logits(scaled, tokens, standard_cfg), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"tie_embeddings": True}, "tie_embeddings=True"),
    ({"mup_base_width": -1}, "mup_base_width=-1: must be an integer >= 0"),
])
def test_bad_configs_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(WIDE, **overrides)


def test_a_single_kv_head_that_does_not_grow_makes_k_and_v_output_like():
    """With one kv head at every width, k and v have one growing dimension, their fan-in: µP's output weights."""
    mqa = dataclasses.replace(WIDE, num_kv_heads=1)
    assert mup_base_config(mqa).num_kv_heads == 1
    kinds = kinds_of(mqa)
    assert kinds["blocks/attn/k/kernel"] == kinds["blocks/attn/v/kernel"] == "output"
    assert kinds["blocks/attn/q/kernel"] == "hidden"
