"""The model's norms through the Pallas kernels against XLA's, and the choice between them."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.model.layers import _pallas_norm, norm, resolve_norm_impl


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])  # LayerNorm and RMSNorm
def test_pallas_norm_in_the_model_matches_xla(preset):
    """The model's norm through kernels/norms.py (interpret mode here) equals XLA's, values and gradients."""
    cfg = get_config(preset)
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (2, 11, cfg.d_model))
    params = {"scale": 1 + 0.1 * jax.random.normal(keys[1], (cfg.d_model,))}
    if cfg.norm == "layernorm":
        params["bias"] = 0.1 * jax.random.normal(keys[2], (cfg.d_model,))
    weights = jax.random.normal(keys[3], x.shape)
    xla = lambda x, p: jnp.sum(norm(p, x, cfg.replace(norm_impl="xla")) * weights)  # noqa: E731
    pallas = lambda x, p: jnp.sum(_pallas_norm(x, p, cfg) * weights)  # noqa: E731
    want, want_grads = jax.value_and_grad(xla, argnums=(0, 1))(x, params)
    got, got_grads = jax.value_and_grad(pallas, argnums=(0, 1))(x, params)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_norm_impl_selection():
    assert resolve_norm_impl("xla", "gpu") == "xla"
    assert resolve_norm_impl("auto", "cpu") == "xla" and resolve_norm_impl("auto", "gpu") == "pallas"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_norm_impl("pallas", "cpu") == "xla"
    assert "needs a CUDA GPU" in str(caught[0].message)
    with pytest.raises(Exception, match="norm_impl"):
        get_config("gpt2-tiny", norm_impl="triton")


@pytest.mark.parametrize("mesh,strategy", [("data=2,fsdp=4", "fsdp"), ("data=4,tensor=2", "tp")])
def test_pallas_norm_under_a_mesh(mesh, strategy):
    """Rows cut over devices (FSDP): the kernel runs per device on its rows; d_model cut (tensor parallel
    activations that shard embed would need a cross-device reduction): XLA's norm instead. Same values."""
    from llmjax.parallel.plan import Plan

    cfg = get_config("gpt2-tiny")
    plan = Plan.create(mesh, strategy)
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (8, 6, cfg.d_model))
    params = {"scale": 1 + 0.1 * jax.random.normal(keys[1], (cfg.d_model,)),
              "bias": 0.1 * jax.random.normal(keys[2], (cfg.d_model,))}
    want = norm(params, x, cfg.replace(norm_impl="xla"))

    @jax.jit
    def sharded(x, params):
        with plan.activations():
            y = _pallas_norm(x, params, cfg)
            return norm(params, x, cfg.replace(norm_impl="xla")) if y is None else y

    np.testing.assert_allclose(sharded(x, params), want, rtol=1e-5, atol=1e-5)
