"""GPTQ: lower layer-wise reconstruction error than round-to-nearest, a whole model, bad calibration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import get_config
from llmjax.model import forward, init_params
from llmjax.quant.formats import QuantizationError, dequantize, quantize
from llmjax.quant.gptq import gptq_matrix, gptq_quantize_params, hessian
from llmjax.quant.model import quantize_params, quantized_forward


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(1024, 96)) @ rng.normal(size=(96, 96)) * 0.3 + rng.normal(size=(1024, 96))  # correlated
    weight = rng.normal(size=(96, 40)) * 0.02
    return inputs, weight


def output_error(inputs, weight, qm):
    return np.linalg.norm(inputs @ (np.asarray(dequantize(qm), np.float64) - weight))


@pytest.mark.parametrize("fmt, group, act_order", [("int4", None, True), ("int4", 32, False), ("int4", 32, True),
                                                    ("int3", 32, True)])
def test_gptq_beats_round_to_nearest(layer, fmt, group, act_order):
    inputs, weight = layer
    gptq = gptq_matrix(weight, hessian(inputs), fmt, group, act_order=act_order, block_size=32)
    rtn = quantize(jnp.asarray(weight, jnp.float32), fmt, group)
    assert gptq.codes.shape == rtn.codes.shape and gptq.scales.shape == rtn.scales.shape  # same storage layout
    assert output_error(inputs, weight, gptq) < 0.9 * output_error(inputs, weight, rtn)


def test_gptq_model_closer_to_float_than_rtn():
    cfg = get_config("llama-tiny")
    params = init_params(cfg, jax.random.key(0))
    calibration = jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size)
    tokens = jax.random.randint(jax.random.key(2), (4, 32), 0, cfg.vocab_size)
    reference = jax.jit(forward, static_argnums=2)(params, tokens, cfg)  # jitted: eager layers dispatch op by op
    gptq = gptq_quantize_params(params, cfg, calibration, "int3", 16)
    rtn = quantize_params(params, cfg, "int3", 16)

    quantized_logits = jax.jit(quantized_forward, static_argnums=2)

    def error(q):
        return float(jnp.square(quantized_logits(q, tokens, cfg) - reference)[..., : cfg.vocab_size].mean())

    assert error(gptq) < error(rtn)


def test_gptq_errors():
    cfg = get_config("gpt2-tiny")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(QuantizationError, match=r"at least 144 calibration tokens.*got 32"):
        gptq_quantize_params(params, cfg, jnp.zeros((2, 16), jnp.int32), "int4", 16)
    with pytest.raises(QuantizationError, match="does not divide the input dimension 48"):
        gptq_quantize_params(params, cfg, jnp.zeros((4, 64), jnp.int32), "int4", 32)
    with pytest.raises(QuantizationError, match="GPTQ quantizes to"):
        gptq_matrix(np.zeros((8, 4)), np.eye(8), "nf4")
