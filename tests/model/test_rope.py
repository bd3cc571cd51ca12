"""RoPE against a float64 NumPy reference written independently (pairs as complex numbers)."""

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ModelConfig, RopeScaling
from llmjax.model.rope import apply_rope
from llmjax.nn import rope_frequencies


def reference_rope(x, positions, inv_freq):
    """x [b, s, h, d] float64: dims (i, i + d/2) form the complex number x_i + 1j x_{i+d/2},
    multiplied by exp(1j * position * inv_freq_i)."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    z = z * np.exp(1j * positions[:, :, None, None] * inv_freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def reference_llama3_frequencies(head_dim, theta, factor, low, high, original):
    """Llama 3.1's rule written per frequency, in plain Python."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelength = 2 * np.pi / freq
        if wavelength < original / high:
            out.append(freq)
        elif wavelength > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize(
    "scaling",
    [None, RopeScaling("linear", factor=4.0), RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_seq_len=64)],
)
@pytest.mark.parametrize("head_dim", [6, 64])
def test_rope_matches_float64_reference(scaling, head_dim):
    cfg = ModelConfig(vocab_size=10, d_model=head_dim * 3, num_layers=1, num_heads=3, d_ff=8,
                      positions="rope", rope_theta=500.0, rope_scaling=scaling, max_seq_len=4096)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 11, 3, head_dim))
    positions = rng.integers(0, 3000, size=(2, 11))
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), cfg)
    want = reference_rope(x, positions, rope_frequencies(head_dim, 500.0, scaling))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4 * np.abs(want).max())


def test_rope_unscaled_frequencies_follow_the_formula():
    np.testing.assert_allclose(rope_frequencies(8, 10000.0), [1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75])


def test_llama3_frequencies_match_rule_per_frequency():
    got = rope_frequencies(128, 500000.0, RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))
    want = reference_llama3_frequencies(128, 500000.0, 32.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert (got < rope_frequencies(128, 500000.0)).any()  # some band really was rescaled


def test_rope_is_relative():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    cfg = ModelConfig(vocab_size=10, d_model=16, num_layers=1, num_heads=1, d_ff=8, positions="rope")
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def score(m, n):
        rq = apply_rope(q, jnp.array([[m]]), cfg)
        rk = apply_rope(k, jnp.array([[n]]), cfg)
        return float((rq * rk).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-4)


def test_interleaved_layout_is_the_same_model_after_converting_the_weights():
    """convert_rope_layout permutes q / k so the logits do not change, and the interleaved model decodes
    with a KV cache (prefill + decode steps) exactly as its full forward computes."""
    import jax

    from llmjax.config import get_config
    from llmjax.model import forward, init_params
    from llmjax.model.rope import convert_rope_layout
    from tests.infer.test_kv_cache import full_forward, run_cache

    cfg = get_config("llama-tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    interleaved_params, interleaved = convert_rope_layout(params, cfg, "interleaved")
    assert interleaved.rope_layout == "interleaved"
    assert not np.array_equal(interleaved_params["blocks"]["attn"]["q"]["kernel"], params["blocks"]["attn"]["q"]["kernel"])
    np.testing.assert_allclose(forward(interleaved_params, tokens, interleaved), forward(params, tokens, cfg),
                               atol=2e-5, rtol=1e-5)

    sequences = [np.random.default_rng(2).integers(0, cfg.vocab_size, n + 5).tolist() for n in (7, 3, 9)]
    got, _ = run_cache(interleaved, interleaved_params, sequences, "left", None)
    want = full_forward(interleaved, interleaved_params, sequences)
    np.testing.assert_allclose(got[..., : cfg.vocab_size], want[..., : cfg.vocab_size], atol=2e-5, rtol=1e-4)
