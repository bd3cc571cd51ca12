"""The Transformer's forward: shapes, masking properties, GQA, remat, jit, init and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax.config import ConfigError, count_params, get_config
from llmjax.model import forward, init_params, model_spec
from llmjax.model.params import count_from_specs, flatten_with_names

FAMILIES = ["gpt2-tiny", "llama-tiny"]


def random_tokens(cfg, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq))


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    cfg = get_config(request.param)
    return cfg, init_params(cfg, jax.random.key(0))


def test_shapes_and_dtypes(model):
    cfg, params = model
    for name, leaf in flatten_with_names(params).items():
        assert leaf.dtype == jnp.float32, name
    logits = forward(params, random_tokens(cfg, 3, 17), cfg)
    assert logits.shape == (3, 17, cfg.padded_vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits[..., : cfg.vocab_size]).all())


def test_padded_vocab_logits_are_masked(model):
    cfg, params = model
    assert cfg.padded_vocab_size > cfg.vocab_size
    logits = forward(params, random_tokens(cfg, 2, 5), cfg)
    assert bool((logits[..., cfg.vocab_size :] == jnp.finfo(jnp.float32).min).all())
    assert float(jax.nn.softmax(logits)[..., cfg.vocab_size :].max()) == 0.0


def test_bfloat16_compute_close_to_float32(model):
    cfg, params = model
    tokens = random_tokens(cfg, 2, 19)
    want = forward(params, tokens, cfg)[..., : cfg.vocab_size]
    got = forward(params, tokens, cfg.replace(compute_dtype="bfloat16"))[..., : cfg.vocab_size]
    assert float(jnp.abs(got - want).max()) < 0.05 * float(jnp.abs(want).max())


def test_causal_no_logit_depends_on_a_later_token(model):
    cfg, params = model
    tokens = random_tokens(cfg, 2, 23)
    changed = tokens.copy()
    changed[:, 15] = (changed[:, 15] + 1) % cfg.vocab_size
    a, b = forward(params, tokens, cfg), forward(params, changed, cfg)
    np.testing.assert_allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert float(jnp.abs(a[:, 15:] - b[:, 15:]).max()) > 1e-3  # the change is visible from there on


def test_packed_segments_do_not_attend_across(model):
    """Two documents packed in one row give the logits of each document run alone."""
    cfg, params = model
    first, second = random_tokens(cfg, 1, 9, seed=1), random_tokens(cfg, 1, 14, seed=2)
    packed = np.concatenate([first, second], axis=1)
    segment_ids = np.array([[1] * 9 + [2] * 14])
    positions = np.array([list(range(9)) + list(range(14))])
    logits = forward(params, packed, cfg, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(logits[:, :9], forward(params, first, cfg), atol=2e-5)
    np.testing.assert_allclose(logits[:, 9:], forward(params, second, cfg), atol=2e-5)


def test_sliding_window_limits_the_receptive_field():
    """Each layer looks back window - 1 tokens, so two layers see at most 2 * (window - 1) back."""
    cfg = get_config("llama-tiny", sliding_window=4)
    params = init_params(cfg, jax.random.key(1))
    tokens = random_tokens(cfg, 1, 20)
    changed = tokens.copy()
    changed[:, 2] = (changed[:, 2] + 1) % cfg.vocab_size
    a, b = forward(params, tokens, cfg), forward(params, changed, cfg)
    reach = 2 + cfg.num_layers * (cfg.sliding_window - 1)  # last position the change can reach
    assert float(jnp.abs(a[:, 2 : reach + 1] - b[:, 2 : reach + 1]).max()) > 1e-4
    np.testing.assert_allclose(a[:, reach + 1 :], b[:, reach + 1 :], atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
    cfg = get_config("llama-tiny")  # 6 query heads sharing 2 kv heads
    params = init_params(cfg, jax.random.key(2))
    group = cfg.num_heads // cfg.num_kv_heads
    mha_cfg = cfg.replace(num_kv_heads=cfg.num_heads)
    mha_params = jax.tree.map(lambda x: x, params)
    for name in ("k", "v"):  # kernel [layers, d_model, kv_heads, head_dim]: head h uses kv head h // group
        mha_params["blocks"]["attn"][name]["kernel"] = jnp.repeat(params["blocks"]["attn"][name]["kernel"], group, axis=2)
    tokens = random_tokens(cfg, 2, 16)
    np.testing.assert_allclose(forward(params, tokens, cfg), forward(mha_params, tokens, mha_cfg), atol=2e-5)


def test_mqa_runs():
    cfg = get_config("llama-tiny", num_kv_heads=1)
    logits = forward(init_params(cfg, jax.random.key(0)), random_tokens(cfg, 2, 8), cfg)
    assert bool(jnp.isfinite(logits[..., : cfg.vocab_size]).all())


def loss_fn(params, tokens, cfg):
    logits = forward(params, tokens[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("change", [{"remat": "full"}, {"remat": "dots"}, {"remat": "dots_no_batch"},
                                    {"scan_unroll": 2}, {"scan_unroll": 5, "remat": "dots"}])
def test_remat_policies_and_unrolling_keep_values_and_gradients(model, change):
    cfg, params = model
    tokens = random_tokens(cfg, 2, 12)
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, cfg)
    loss_r, grads_r = jax.value_and_grad(loss_fn)(params, tokens, cfg.replace(**change))
    assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)
    for (name, g), g_r in zip(flatten_with_names(grads).items(), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, atol=1e-6, err_msg=name)


def test_float32_gradients_match_float64(model):
    cfg, params = model
    tokens = random_tokens(cfg, 2, 12)
    grad_fn = jax.jit(jax.grad(loss_fn), static_argnums=2)  # jitted: eager layers dispatch op by op
    grads = grad_fn(params, tokens, cfg)
    with jax.enable_x64(True):
        cfg64 = cfg.replace(param_dtype="float64", compute_dtype="float64")
        params64 = jax.tree.map(lambda p: jnp.asarray(np.asarray(p), jnp.float64), params)
        grads64 = grad_fn(params64, tokens, cfg64)
        # Errors are measured against the largest gradient: some are exactly zero in exact
        # arithmetic (a key bias shifts every score of a query equally) and only rounding remains.
        largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads64))
        for (name, g), g64 in zip(flatten_with_names(grads).items(), jax.tree.leaves(grads64)):
            np.testing.assert_allclose(g, g64, rtol=1e-3, atol=1e-5 * largest, err_msg=name)


def test_jitted_forward_compiles_once_per_shape(model):
    cfg, params = model
    traces = []

    @jax.jit
    def run(params, tokens):
        traces.append(tokens.shape)
        return forward(params, tokens, cfg)

    for seed in range(3):
        run(params, jnp.asarray(random_tokens(cfg, 2, 10, seed=seed)))
    assert traces == [(2, 10)]


def test_parameter_counts_match_the_formula():
    from llmjax.config import PRESETS

    for name, cfg in PRESETS.items():
        assert count_from_specs(model_spec(cfg)) == count_params(cfg, padded_vocab=True), name
    # Published sizes: GPT-2 small and Llama 3 8B.
    assert count_params(get_config("gpt2-124m")) == 124_439_808
    assert count_params(get_config("llama-8b")) == 8_030_261_248


def test_init_follows_gpt2_scheme():
    cfg = get_config("gpt2-124m", num_layers=4, vocab_size=512, max_seq_len=128)
    params = init_params(cfg, jax.random.key(3))
    assert float(params["embed"]["token"].std()) == pytest.approx(0.02, rel=0.02)
    assert float(params["blocks"]["attn"]["q"]["kernel"].std()) == pytest.approx(0.02, rel=0.02)
    residual = 0.02 / np.sqrt(2 * cfg.num_layers)
    assert float(params["blocks"]["attn"]["o"]["kernel"].std()) == pytest.approx(residual, rel=0.02)
    assert float(params["blocks"]["mlp"]["down"]["kernel"].std()) == pytest.approx(residual, rel=0.02)
    assert bool((params["blocks"]["attn_norm"]["scale"] == 1).all())
    assert bool((params["blocks"]["mlp"]["up"]["bias"] == 0).all())
    layers = params["blocks"]["attn"]["q"]["kernel"]
    assert not bool(jnp.allclose(layers[0], layers[1]))  # layers are independent draws


def test_init_is_deterministic_per_key(model):
    cfg, params = model
    again = init_params(cfg, jax.random.key(0))
    other = init_params(cfg, jax.random.key(1))
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
    assert not bool((params["embed"]["token"] == other["embed"]["token"]).all())


# --- bad input ---------------------------------------------------------------------------

def test_token_outside_vocab_is_rejected(model):
    cfg, params = model
    tokens = random_tokens(cfg, 1, 6)
    tokens[0, 3] = cfg.vocab_size
    with pytest.raises(ValueError, match=rf"token id {cfg.vocab_size} is outside the vocabulary \[0, {cfg.vocab_size}\)"):
        forward(params, tokens, cfg)
    tokens[0, 3] = -1
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
        forward(params, tokens, cfg)


def test_sequence_longer_than_max_is_rejected(model):
    cfg, params = model
    with pytest.raises(ValueError, match=f"sequence length {cfg.max_seq_len + 1} exceeds the model's max_seq_len={cfg.max_seq_len}"):
        forward(params, random_tokens(cfg, 1, cfg.max_seq_len + 1), cfg)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):  # also under jit: shapes are static
        jax.jit(lambda p, t: forward(p, t, cfg))(params, jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))


def test_tokens_of_wrong_rank_or_dtype_are_rejected(model):
    cfg, params = model
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\] integers, got shape \(6,\)"):
        forward(params, np.zeros(6, np.int32), cfg)
    with pytest.raises(TypeError, match="tokens must be integers, got dtype float32"):
        forward(params, np.zeros((1, 6), np.float32), cfg)


def test_positions_outside_the_learned_table_are_rejected():
    cfg = get_config("gpt2-tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = random_tokens(cfg, 1, 4)
    with pytest.raises(ValueError, match=rf"position {cfg.max_seq_len} is outside the learned position table"):
        forward(params, tokens, cfg, positions=np.array([[0, 1, 2, cfg.max_seq_len]]))
    with pytest.raises(ValueError, match=r"positions have shape \(1, 3\), expected the tokens' \(1, 4\)"):
        forward(params, tokens, cfg, positions=np.array([[0, 1, 2]]))


def test_config_name_is_a_label_not_part_of_equality():
    cfg = get_config("llama-tiny")
    assert cfg.replace(name="other") == cfg and hash(cfg.replace(name="other")) == hash(cfg)


def test_scan_unroll_auto_unrolls_every_block_on_gpus_only():
    from llmjax.model.transformer import scan_unroll

    cfg = get_config("llama-tiny")
    assert scan_unroll(cfg, "gpu") == cfg.num_layers and scan_unroll(cfg, "cpu") == 1
    assert scan_unroll(cfg.replace(scan_unroll=3), "gpu") == min(3, cfg.num_layers)
    with pytest.raises(ConfigError, match="scan_unroll must be a non-negative integer"):
        cfg.replace(scan_unroll=-1)
