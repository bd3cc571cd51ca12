"""Encoders in the one Transformer (bidirectional attention, post-norm, token types, embedding norm), the key padding
mask for encoders and decoders alike, and pooling against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, get_config
from llmjax.model import hidden_states, init_params
from llmjax.model.pooling import cls_pool, l2_normalize, last_token_pool, mean_pool, pool

rng = np.random.default_rng(0)


@pytest.fixture(scope="module")
def encoder():
    cfg = get_config("bert-tiny")
    return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def decoder():
    cfg = get_config("gpt2-tiny")
    return cfg, init_params(cfg, jax.random.key(0))


def tokens_of(cfg, batch, seq, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)))


def test_encoder_parameters(encoder):
    cfg, params = encoder
    assert params["embed"]["token_type"].shape == (2, cfg.d_model)
    assert set(params["embed"]["norm"]) == {"scale", "bias"}
    assert "final_norm" not in params and "lm_head" not in params


def test_encoder_attention_is_bidirectional_and_decoder_causal(encoder, decoder):
    """Changing the last token changes every position of an encoder, no earlier position of a decoder."""
    for (cfg, params), earlier_changes in ((encoder, True), (decoder, False)):
        tokens = tokens_of(cfg, 1, 9)
        changed = tokens.at[0, -1].set((tokens[0, -1] + 1) % cfg.vocab_size)
        before, after = hidden_states(params, tokens, cfg), hidden_states(params, changed, cfg)
        assert bool((jnp.abs(before - after)[0, :-1].max(-1) > 1e-6).all()) == earlier_changes, cfg.name


def test_token_types_enter_the_embedding(encoder):
    cfg, params = encoder
    tokens = tokens_of(cfg, 2, 7)
    zeros = hidden_states(params, tokens, cfg)
    np.testing.assert_array_equal(np.asarray(zeros), np.asarray(hidden_states(params, tokens, cfg,
                                                                              token_types=jnp.zeros_like(tokens))))
    ones = hidden_states(params, tokens, cfg, token_types=jnp.ones_like(tokens))
    assert float(jnp.abs(ones - zeros).min()) > 0


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_padding_is_invisible_to_real_tokens(request, which, side):
    """A padded row's real tokens get the hidden states of the sequence alone, padding on either side (left padding
    with positions counted from the first real token)."""
    cfg, params = request.getfixturevalue(which)
    lengths, seq = [11, 6, 1], 11
    tokens = tokens_of(cfg, 3, seq)
    offsets = [seq - n if side == "left" else 0 for n in lengths]
    mask = np.array([[offset <= j < offset + n for j in range(seq)] for n, offset in zip(lengths, offsets)])
    positions = np.maximum(np.arange(seq)[None] - np.array(offsets)[:, None], 0)
    batch = hidden_states(params, tokens, cfg, token_mask=jnp.asarray(mask), positions=jnp.asarray(positions))
    for row, (n, offset) in enumerate(zip(lengths, offsets)):
        alone = hidden_states(params, tokens[row:row + 1, offset:offset + n], cfg)[0]
        np.testing.assert_allclose(np.asarray(batch[row, offset:offset + n]), np.asarray(alone), atol=2e-5)


def test_pooling_against_numpy():
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], bool)  # right-, left-padded, empty
    mean = np.stack([hidden[i][mask[i]].mean(0) if mask[i].any() else np.zeros(4) for i in range(3)])
    np.testing.assert_allclose(np.asarray(mean_pool(hidden, mask)), mean, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cls_pool(hidden)), hidden[:, 0])
    np.testing.assert_allclose(np.asarray(last_token_pool(hidden, mask)), np.stack([hidden[0, 2], hidden[1, 4],
                                                                                  np.zeros(4)]))
    unit = np.asarray(pool(hidden, mask, "mean", normalize=True))
    np.testing.assert_allclose(unit[:2], mean[:2] / np.linalg.norm(mean[:2], axis=1, keepdims=True), atol=1e-6)
    assert not unit[2].any()  # a zero vector stays zero
    np.testing.assert_allclose(np.asarray(l2_normalize(jnp.asarray([[3.0, 4.0]]))), [[0.6, 0.8]])
    bf16 = pool(jnp.asarray(hidden, jnp.bfloat16), mask, "mean")
    assert bf16.dtype == jnp.float32


def test_bad_input_gets_one_clear_error(encoder, decoder):
    cfg, params = encoder
    tokens = tokens_of(cfg, 2, 5)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool(jnp.zeros((2, 5, 3)), jnp.ones((2, 5)), "max")
    with pytest.raises(ValueError, match="token type 2 is outside"):
        hidden_states(params, tokens, cfg, token_types=np.full((2, 5), 2))
    with pytest.raises(ValueError, match="token_mask have shape"):
        hidden_states(params, tokens, cfg, token_mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="no token-type embedding"):
        hidden_states(decoder[1], tokens, decoder[0], token_types=np.zeros((2, 5), int))
    for field, value, message in [("norm_position", "middle", "norm_position"), ("type_vocab_size", -1, ">= 0"),
                                  ("causal", "no", "True or False"), ("activation", "relu", "activation")]:
        with pytest.raises(ConfigError, match=message):
            get_config("bert-tiny", **{field: value})
    with pytest.raises(ConfigError, match="looks back only"):
        get_config("bert-tiny", sliding_window=4)
