"""Expert parallelism on 8 simulated CPU devices: experts sharded over the `expert` mesh axis, tokens
exchanged with all-to-all inside shard_map, values and gradients equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, get_config
from llmjax.model.moe import expert_parallel_mesh, moe_layer, moe_spec
from llmjax.model.params import init_from_specs
from llmjax.parallel.logical import activation_rules
from llmjax.parallel.mesh import make_mesh

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CFG = get_config("llama-moe-tiny").replace(num_experts=8, experts_per_token=2)


def setup(cfg, batch=8, seq=12):
    params = init_from_specs(moe_spec(cfg), jax.random.key(0))
    params["router"]["kernel"] = params["router"]["kernel"] * 20
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, seq, cfg.d_model)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    return params, x, cotangent


def loss_and_grads(cfg, params, x, cotangent):
    def loss(params, x):
        y, metrics = moe_layer(params, x, cfg)
        return jnp.sum(y * cotangent) + metrics["load_balance_loss"] + metrics["router_z_loss"], metrics

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return value, metrics, grads


def assert_same(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mesh_axes,impl,capacity_factor", [
    ("expert=8", "capacity", 1.0),  # tokens dropped: per-sequence capacity drops the same ones
    ("data=2,expert=4", "capacity", 1.25),
    ("data=2,expert=4", "ragged_dot", 1.25),  # dropless: capacity = seq under expert parallelism
])
def test_expert_parallel_equals_one_device(mesh_axes, impl, capacity_factor):
    cfg = CFG.replace(moe_impl=impl, capacity_factor=capacity_factor)
    params, x, cotangent = setup(cfg)
    want = loss_and_grads(cfg, params, x, cotangent)
    mesh = make_mesh(mesh_axes)
    with jax.set_mesh(mesh):
        assert expert_parallel_mesh() is not None
        got = loss_and_grads(cfg, params, x, cotangent)
    assert_same(got, want)
    if impl == "capacity" and capacity_factor == 1.0:
        assert float(want[1]["dropped_fraction"]) > 0


def test_expert_parallel_under_activation_rules_shards_the_experts():
    """The training plan's way in: activation rules (llmjax.parallel.logical) name the mesh."""
    cfg = CFG.replace(moe_impl="capacity", capacity_factor=2.0)
    params, x, cotangent = setup(cfg)
    want = loss_and_grads(cfg, params, x, cotangent)
    mesh = make_mesh("fsdp=2,expert=4")
    with activation_rules(mesh, {"batch": ("data", "fsdp", "expert")}):
        assert expert_parallel_mesh()[1] == ("fsdp", "expert")
        got = loss_and_grads(cfg, params, x, cotangent)
        text = jax.jit(lambda p, x: moe_layer(p, x, cfg)[0]).lower(params, x).as_text()
    assert "all_to_all" in text or "all-to-all" in text
    assert_same(got, want)


def test_experts_not_dividing_the_expert_axis_is_one_clear_error():
    cfg = CFG.replace(num_experts=6)
    params, x, cotangent = setup(cfg)
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        with pytest.raises(ConfigError, match=r"num_experts=6 does not divide over an expert-parallel size of 4"):
            moe_layer(params, x, cfg)


def test_training_steps_with_expert_parallel_plan_equal_one_device():
    """Whole train steps through the training Plan (llmjax.parallel.plan) with experts sharded over
    `expert` and the batch over `data` and `expert`: losses, MoE metrics and updated parameters equal
    one device's."""
    from llmjax.config import TrainConfig
    from llmjax.parallel.plan import Plan
    from llmjax.train.step import init_train_state, make_train_step, windows_to_batch

    model = get_config("llama-moe-tiny").replace(num_layers=1, num_experts=4, moe_impl="capacity", capacity_factor=1.0)
    train_cfg = TrainConfig(lr=3e-3, warmup_steps=0, total_steps=1)
    rng = np.random.default_rng(0)
    batches = [windows_to_batch(jnp.asarray(rng.integers(0, model.vocab_size, (8, 17))))]

    def run(plan):
        state = (plan.init_state(model, train_cfg, jax.random.key(0)) if plan
                 else jax.jit(init_train_state, static_argnums=(0, 1))(model, train_cfg, jax.random.key(0)))
        step = make_train_step(model, train_cfg, plan=plan)
        history = []
        for batch in batches:
            if plan:
                batch = jax.device_put(batch, plan.batch_sharding())
            state, metrics = step(state, batch)
            history.append({k: np.asarray(v) for k, v in metrics.items() if k in (
                "loss", "grad_norm", "moe/load_balance_loss", "moe/dropped_fraction", "moe/expert_load")})
        return history, jax.device_get(state.params)

    plan = Plan.create("data=2,expert=4", "dp")
    expert_kernel = plan.param_shardings(model)["moe_blocks"]["moe"]["experts"]["up"]["kernel"]
    assert "expert" in str(expert_kernel.spec)
    (want, want_params), (got, got_params) = run(None), run(plan)
    assert float(want[0]["moe/dropped_fraction"]) > 0
    for w, g in zip(want, got):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=2e-4, atol=2e-5, err_msg=key)
    assert_same(got_params, want_params)
