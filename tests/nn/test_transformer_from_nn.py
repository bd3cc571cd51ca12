"""A Transformer LM written only with llmjax.nn functions equals llmjax.model.forward on the same weights:
the model is built from these functions, not from copies of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import nn
from llmjax.config import get_config
from llmjax.model import forward, init_params


def lm_from_nn(params, tokens, cfg):
    """tokens [batch, seq] -> logits [batch, seq, vocab], pre-norm blocks, as a course would write them."""
    seq = tokens.shape[1]
    positions = jnp.arange(seq)

    def norm(p, x):
        if cfg.norm == "layernorm":
            return nn.layer_norm(x, p["scale"], p["bias"], cfg.norm_eps)
        return nn.rms_norm(x, p["scale"], cfg.norm_eps)

    def project(p, x, in_dims=1):
        return nn.linear(x, p["kernel"], p.get("bias"), in_dims=in_dims)

    x = nn.embedding(params["embed"]["token"], tokens)  # [batch, seq, d_model]
    if cfg.positions == "learned":
        x = x + nn.embedding(params["embed"]["position"], positions)
    for layer in range(cfg.num_layers):
        p = jax.tree.map(lambda a: a[layer], params["blocks"])
        h = norm(p["attn_norm"], x)
        q, k, v = (project(p["attn"][name], h) for name in "qkv")  # [batch, seq, heads, head_dim]
        if cfg.positions == "rope":
            q, k = (nn.rope(t, positions, theta=cfg.rope_theta, layout=cfg.rope_layout) for t in (q, k))
        x = x + project(p["attn"]["o"], nn.scaled_dot_product_attention(q, k, v, causal=True), in_dims=2)
        h = norm(p["mlp_norm"], x)
        if cfg.activation == "swiglu":
            hidden = nn.swiglu(project(p["mlp"]["gate"], h), project(p["mlp"]["up"], h))
        else:
            hidden = nn.gelu(project(p["mlp"]["up"], h), approximate=True)
        x = x + project(p["mlp"]["down"], hidden)
    x = norm(params["final_norm"], x)
    output = params["embed"]["token"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
    return nn.linear(x, output)[..., : cfg.vocab_size]


@pytest.mark.parametrize(
    "preset, overrides",
    [("gpt2-tiny", {}), ("llama-tiny", {}), ("llama-tiny", {"rope_layout": "interleaved", "tie_embeddings": True})],
)
def test_lm_from_nn_equals_model_forward(preset, overrides):
    cfg = get_config(preset, **overrides)
    params = init_params(cfg, jax.random.key(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
    want = forward(params, tokens, cfg)[..., : cfg.vocab_size]
    got = lm_from_nn(params, tokens, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
