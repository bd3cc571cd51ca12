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
