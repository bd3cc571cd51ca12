"""The quantized model: forward equals the float model on the dequantized weights, decoding through the
generation loop with quantized matrices, per-run remat policies (offload included), bad targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import get_config
from llmjax.infer.generate import generate
from llmjax.model import forward, init_params
from llmjax.quant.formats import QuantizedMatrix
from llmjax.quant.model import (
    materialize,
    param_bytes,
    quantize_params,
    quantized_decode_params,
    quantized_forward,
)


@pytest.fixture(scope="module")
def model():
    cfg = get_config("llama-tiny")
    return cfg, init_params(cfg, jax.random.key(0))


def test_forward_equals_float_model_on_dequantized_weights(model):
    cfg, params = model
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    qparams = quantize_params(params, cfg, "int4", 16)
    kernels = [x for x in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QuantizedMatrix))
               if isinstance(x, QuantizedMatrix)]
    assert len(kernels) == 7  # q, k, v, o, gate, up, down
    np.testing.assert_allclose(quantized_forward(qparams, tokens, cfg),
                               forward(materialize(qparams, jnp.float32), tokens, cfg), rtol=1e-5, atol=1e-5)
    assert param_bytes(qparams["blocks"]) < 0.3 * param_bytes(params["blocks"])


def test_decoding_from_quantized_matrices(model):
    cfg, params = model
    qparams = quantize_params(params, cfg, "nf4", 16)
    prompts = [[5, 9, 2, 44], [7, 1]]
    ours = generate(None, cfg, prompts, max_new_tokens=4, prepared=quantized_decode_params(qparams, cfg))
    reference = generate(materialize(qparams, jnp.float32), cfg, prompts, max_new_tokens=4)
    # nf4's fused q|k|v re-blocks its scale constants: tokens agree unless two logits nearly tie
    assert ours.tokens == reference.tokens


def test_remat_policies_give_the_same_gradients(model):
    from llmjax.quant.model import layerwise_hidden_states

    cfg, params = model
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

    def loss(p, remat):
        return jnp.square(layerwise_hidden_states(p, tokens, cfg, remat=remat)).mean()

    reference = jax.grad(loss)(params, "none")
    for remat in ("offload",):  # the policy this issue adds; the others are checked in tests/model
        grads = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, reference)
    with pytest.raises(ValueError, match="remat='sometimes': expected one of"):
        loss(params, "sometimes")


def test_targets_that_match_nothing(model):
    cfg, params = model
    with pytest.raises(ValueError, match=r"pattern 'attn/wq' matches no linear weight of this model; available: .*blocks/mlp/down"):
        quantize_params(params, cfg, "int8", targets=("attn/wq",))


@pytest.mark.gpu
def test_decoding_through_the_fused_kernel_on_gpu():
    cfg = get_config("llama-125m", num_layers=2, compute_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    qparams = quantize_params(params, cfg, "int4", 128)
    prompts = [[5, 9, 2, 44, 17, 3, 8, 11]]
    fused = generate(None, cfg, prompts, max_new_tokens=8, prepared=quantized_decode_params(qparams, cfg, "pallas"))
    xla = generate(None, cfg, prompts, max_new_tokens=8, prepared=quantized_decode_params(qparams, cfg, "xla"))
    assert fused.tokens == xla.tokens


@pytest.mark.parametrize("tied", [True, False])
def test_decoding_through_the_cpu_matvec_and_an_int8_head(tied):
    """quantized_decode_params(matmul="auto") decodes through kernels.matmul_quant.quantized_matvec on the CPU, and
    head="int8" holds the output head (the tied embedding, apart from its lookup table, or lm_head) as int8: exact for
    a head that int8 groups represent (a GGUF Q8_0 embedding), so the tokens equal the float head's reference path."""
    from llmjax.quant.formats import dequantize, quantize

    cfg = get_config("llama-tiny", tie_embeddings=tied)
    params = init_params(cfg, jax.random.key(0))
    qparams = quantize_params(params, cfg, "int4", 16)
    group = 32 if cfg.d_model % 32 == 0 else None  # the head's groups: 32 inputs, else one per output
    if tied:  # [vocab, d_model] -> int8-representable, like a Q8_0 table
        qparams["embed"]["token"] = dequantize(quantize(params["embed"]["token"].T, "int8", group)).T
        expected = qparams["embed"]["token"].T
    else:
        qparams["lm_head"]["kernel"] = expected = dequantize(quantize(params["lm_head"]["kernel"], "int8", group))
    prompts = [[5, 9, 2, 44], [7, 1]]
    prepared = quantized_decode_params(qparams, cfg, "auto", head="int8")
    head = prepared["lm_head"]["kernel"]
    assert isinstance(head, QuantizedMatrix) and (head.format, head.matmul) == ("int8", "auto")
    np.testing.assert_array_equal(dequantize(head), expected)
    ours = generate(None, cfg, prompts, max_new_tokens=6, prepared=prepared)
    reference = generate(None, cfg, prompts, max_new_tokens=6, prepared=quantized_decode_params(qparams, cfg, "xla"))
    assert ours.tokens == reference.tokens
    # head="auto": int8 for this int8-representable head; float for the random embedding it was made from.
    assert isinstance(quantized_decode_params(qparams, cfg, head="auto")["lm_head"]["kernel"], QuantizedMatrix)
    if tied:
        random_head = {**qparams, "embed": init_params(cfg, jax.random.key(0))["embed"]}  # (params' was replaced)
        assert "lm_head" not in quantized_decode_params(random_head, cfg, head="auto")
    with pytest.raises(ValueError, match="head='int4': expected one of 'float', 'int8', 'auto'"):
        quantized_decode_params(qparams, cfg, head="int4")
