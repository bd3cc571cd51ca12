"""Prefill + decode over the KV cache equals the full forward pass: left and right padding in one batch,
GQA caches at kv-head size, sliding-window caches that wrap around, int8 caches within their tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import get_config
from llmjax.infer import kv_cache
from llmjax.infer.decode_model import decode_step_jit, prefill_jit, prepare_params
from llmjax.infer.generate import pad_prompts
from llmjax.model import forward, init_params

LENGTHS = [7, 3, 9]
STEPS = 5


def run_cache(cfg, params, sequences, padding, cache_dtype, fuse=True):
    """Logits after each prefix (prompt, then STEPS teacher-forced tokens) through prefill/decode_step."""
    tokens, valid = pad_prompts([s[:n] for s, n in zip(sequences, LENGTHS)], padding, multiple=1)
    capacity = kv_cache.cache_capacity(cfg, tokens.shape[1] + STEPS)
    cache = kv_cache.init_cache(cfg, len(LENGTHS), capacity, cache_dtype)
    dparams = prepare_params(params, cfg, fuse=fuse)
    logits, cache = prefill_jit(dparams, jnp.asarray(tokens), jnp.asarray(valid), cache, cfg)
    out = [logits]
    for t in range(STEPS):
        nxt = jnp.asarray([s[n + t] for s, n in zip(sequences, LENGTHS)])
        logits, cache = decode_step_jit(dparams, nxt, cache, cfg)
        out.append(logits)
    return np.stack(out, axis=1), cache  # [batch, STEPS + 1, vocab]


def full_forward(cfg, params, sequences):
    """The logits of the last token of every prefix, from one causal forward (right padding is harmless)."""
    width = max(LENGTHS) + STEPS
    tokens = np.zeros((len(LENGTHS), width), np.int32)
    for row, s in enumerate(sequences):
        tokens[row, : len(s)] = s
    logits = np.asarray(forward(params, tokens, cfg))
    return np.stack([logits[row, n - 1: n + STEPS] for row, n in enumerate(LENGTHS)])


@pytest.mark.parametrize("name,overrides", [("llama-tiny", {}), ("gpt2-tiny", {}),
                                            ("llama-tiny", {"sliding_window": 4})])
def test_cache_decoding_equals_full_forward(name, overrides):
    cfg = get_config(name, **overrides)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, cfg.vocab_size, n + STEPS).tolist() for n in LENGTHS]
    want = full_forward(cfg, params, sequences)
    for padding in ("left", "right"):
        got, cache = run_cache(cfg, params, sequences, padding, None)
        np.testing.assert_allclose(got[..., : cfg.vocab_size], want[..., : cfg.vocab_size], atol=2e-5, rtol=1e-4)
        # GQA: stored at kv-head size; a window: only `window` slots, wrapped around.
        assert cache["layers"][0]["k"].shape[2:] == (cfg.num_kv_heads, cfg.head_dim)
        if cfg.sliding_window:
            assert cache["layers"][0]["k"].shape[1] == cfg.sliding_window
    if overrides or name != "llama-tiny":
        return  # the separate projections and the int8 cache are checked once (CI time)
    separate = prepare_params(params, cfg, fuse=False)["layers"][0]
    assert {"q", "k", "v"} <= separate["attn"].keys() and {"gate", "up"} <= separate["mlp"].keys()
    got, _ = run_cache(cfg, params, sequences, "left", None, fuse=False)
    np.testing.assert_allclose(got[..., : cfg.vocab_size], want[..., : cfg.vocab_size], atol=2e-5, rtol=1e-4)
    got, cache = run_cache(cfg, params, sequences, "left", "int8")
    assert cache["layers"][0]["k"].dtype == jnp.int8 and cache["layers"][0]["k_scale"].shape[-1] == cfg.num_kv_heads
    scale = np.abs(want).max()
    assert np.abs(got[..., : cfg.vocab_size] - want[..., : cfg.vocab_size]).max() < 0.02 * scale


def test_quantize_round_trip_error_is_within_half_a_step():
    x = jax.random.normal(jax.random.key(1), (3, 5, 2, 24)) * 3
    values, scale = kv_cache.quantize(x)
    error = np.abs(np.asarray(kv_cache.dequantize(values, scale, jnp.float32) - x))
    assert (error <= np.asarray(scale)[..., None] / 2 + 1e-6).all()


def test_prompt_layout_positions_and_slots():
    valid = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    positions, next_slot, next_position = kv_cache.prompt_layout(valid)
    np.testing.assert_array_equal(positions, [[-1, -1, 0, 1, 2], [0, 1, -1, -1, -1]])
    np.testing.assert_array_equal(next_slot, [5, 2])
    np.testing.assert_array_equal(next_position, [3, 2])
    # A 3-slot ring after a 5-token prompt holds indices 3, 4, 2 (the last three).
    np.testing.assert_array_equal(kv_cache.prefill_slots(jnp.asarray([5]), 3), [[3, 4, 2]])


def test_bad_cache_requests():
    cfg = get_config("llama-tiny")
    with pytest.raises(kv_cache.CacheError, match="cache dtype"):
        kv_cache.init_cache(cfg, 1, 8, "int4")
    with pytest.raises(kv_cache.CacheError, match="capacity"):
        kv_cache.init_cache(cfg, 1, 0)
