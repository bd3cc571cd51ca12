"""RoPE context-extension scalings "ntk" and "yarn": frequencies and YaRN's attention factor against float64
NumPy formulas written here from the papers (and against Hugging Face transformers when installed), rope's
q.k growing by attention_factor ** 2 under yarn, and the factor <= 1 rejection."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, RopeScaling
from llmjax.nn.rope import rope, rope_attention_factor, rope_frequencies


def ntk_reference(head_dim, theta, factor):
    """NTK-aware scaling (bloc97, 2023): base b -> b * s ** (d / (d - 2)), theta_i = base ** (-2i / d)."""
    base = theta * factor ** (head_dim / (head_dim - 2))
    return np.array([base ** (-2 * i / head_dim) for i in range(head_dim // 2)])


def yarn_reference(head_dim, theta, factor, original, beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023, eq. 17-18, with the reference code's integer bounds): pair i of frequency
    f_i = theta ** (-2i / d) turns r_i = L f_i / (2 pi) times over the original length L. The dimension turning
    exactly b times is d ln(L / (2 pi b)) / (2 ln theta); the ramp runs from floor(that at beta_fast) to
    ceil(that at beta_slow) over the pair index i; h(f_i) = (1 - gamma) f_i / s + gamma f_i, gamma = 1 - ramp."""
    def dim_turning(b):
        return head_dim * math.log(original / (2 * math.pi * b)) / (2 * math.log(theta))

    low = max(math.floor(dim_turning(beta_fast)), 0)
    high = min(math.ceil(dim_turning(beta_slow)), head_dim - 1)
    out = []
    for i in range(head_dim // 2):
        f = theta ** (-2 * i / head_dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        gamma = 1 - ramp
        out.append((1 - gamma) * f / factor + gamma * f)
    return np.array(out)


@pytest.mark.parametrize("head_dim, theta, factor", [(16, 10_000.0, 2.0), (64, 500_000.0, 8.0), (4, 100.0, 3.5)])
def test_ntk_frequencies(head_dim, theta, factor):
    got = rope_frequencies(head_dim, theta, RopeScaling("ntk", factor))
    np.testing.assert_allclose(got, ntk_reference(head_dim, theta, factor), rtol=1e-12)
    assert got[0] == 1.0  # the highest frequency kept ...
    np.testing.assert_allclose(got[-1], rope_frequencies(head_dim, theta)[-1] / factor, rtol=1e-12)  # lowest / s


YARN_CASES = [(64, 10_000.0, 4.0, 2048, (32.0, 1.0)), (128, 500_000.0, 8.0, 8192, (32.0, 1.0)),
              (16, 500.0, 2.0, 64, (16.0, 2.0)), (8, 10_000.0, 2.0, 32, (32.0, 1.0))]


@pytest.mark.parametrize("head_dim, theta, factor, original, betas", YARN_CASES)
def test_yarn_frequencies(head_dim, theta, factor, original, betas):
    scaling = RopeScaling("yarn", factor, original_max_seq_len=original, beta_fast=betas[0], beta_slow=betas[1])
    got = rope_frequencies(head_dim, theta, scaling)
    want = yarn_reference(head_dim, theta, factor, original, *betas)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    plain = rope_frequencies(head_dim, theta)
    assert np.all(got <= plain) and np.all(got >= plain / factor * (1 - 1e-12))


def test_yarn_attention_factor():
    assert rope_attention_factor(RopeScaling("yarn", 4.0)) == pytest.approx(0.1 * math.log(4.0) + 1)
    assert rope_attention_factor(RopeScaling("yarn", 16.0)) == pytest.approx(1.2772588722239781)
    assert rope_attention_factor(RopeScaling("yarn", 4.0, attention_factor=1.5)) == 1.5
    for scaling in (None, RopeScaling("linear", 4.0), RopeScaling("ntk", 4.0), RopeScaling("llama3", 8.0)):
        assert rope_attention_factor(scaling) == 1.0


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_yarn_scales_scores_by_attention_factor_squared(rng, layout):
    """q.k under yarn = attention_factor ** 2 * q.k rotated by the same frequencies with unscaled cos / sin."""
    scaling = RopeScaling("yarn", 4.0, original_max_seq_len=64)
    m = rope_attention_factor(scaling)
    q, k = rng.normal(size=(2, 9, 3, 16)), rng.normal(size=(2, 9, 3, 16))
    positions = jnp.asarray(rng.integers(0, 256, (2, 9)))
    inv_freq = rope_frequencies(16, 500.0, scaling)

    def unscaled(x):  # the pairs as complex numbers, rotated with |exp(i angle)| = 1
        half = 8
        if layout == "half":
            z = x[..., :half] + 1j * x[..., half:]
        else:
            z = x[..., 0::2] + 1j * x[..., 1::2]
        return z * np.exp(1j * np.asarray(positions)[:, :, None, None] * inv_freq)

    def scores(a, b):
        return np.einsum("bshk,bthk->bhst", a, b)

    got = scores(rope(jnp.asarray(q), positions, theta=500.0, scaling=scaling, layout=layout),
                 rope(jnp.asarray(k), positions, theta=500.0, scaling=scaling, layout=layout))
    zq, zk = unscaled(q), unscaled(k)
    want = np.einsum("bshk,bthk->bhst", zq.real, zk.real) + np.einsum("bshk,bthk->bhst", zq.imag, zk.imag)
    np.testing.assert_allclose(got, m**2 * want, rtol=1e-4, atol=1e-4)
    assert m > 1.1  # the check has teeth: the scores differ from the unscaled ones by 1.9%
    assert not np.allclose(got, want, rtol=1e-2, atol=1e-2)


def test_ntk_and_linear_leave_magnitudes_alone(rng):
    x = rng.normal(size=(1, 5, 2, 8))
    for scaling in (RopeScaling("ntk", 4.0), RopeScaling("linear", 4.0)):
        got = np.asarray(rope(jnp.asarray(x), jnp.arange(5), scaling=scaling))
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["ntk", "yarn"])
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_factor_must_extend_the_context(kind, factor):
    with pytest.raises(ConfigError, match=r"RopeScaling\.factor=.*must be > 1"):
        RopeScaling(kind, factor)


def test_yarn_betas_validated_and_ntk_needs_head_dim_above_two():
    with pytest.raises(ConfigError, match="beta_fast"):
        RopeScaling("yarn", 2.0, beta_fast=1.0, beta_slow=32.0)
    with pytest.raises(ValueError, match="head_dim > 2"):
        rope_frequencies(2, 10_000.0, RopeScaling("ntk", 2.0))


@pytest.mark.parametrize("head_dim, theta, factor, original, betas", YARN_CASES)
def test_yarn_matches_transformers(head_dim, theta, factor, original, betas):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                       "original_max_position_embeddings": original, "beta_fast": betas[0], "beta_slow": betas[1]}
    hf = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                     max_position_embeddings=int(original * factor), rope_parameters=rope_parameters)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    scaling = RopeScaling("yarn", factor, original_max_seq_len=original, beta_fast=betas[0], beta_slow=betas[1])
    np.testing.assert_allclose(rope_frequencies(head_dim, theta, scaling), inv_freq.double().numpy(), rtol=1e-6)
    assert rope_attention_factor(scaling) == pytest.approx(attention_factor, rel=1e-12)


@pytest.mark.parametrize("head_dim, theta, factor", [(16, 10_000.0, 2.0), (64, 500_000.0, 4.0)])
def test_ntk_matches_transformers_dynamic_at_its_fixed_point(head_dim, theta, factor):
    """transformers' "dynamic" NTK uses base * (s * n / L - (s - 1)) ** (d / (d - 2)) at length n; at
    n = L (2s - 1) / s that is the static NTK-aware base * s ** (d / (d - 2))."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = 1024
    rope_parameters = {"rope_type": "dynamic", "rope_theta": theta, "factor": factor}
    hf = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                     max_position_embeddings=original, rope_parameters=rope_parameters)
    seq_len = original * (2 * factor - 1) / factor
    assert seq_len == int(seq_len)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=int(seq_len))
    np.testing.assert_allclose(rope_frequencies(head_dim, theta, RopeScaling("ntk", factor)), inv_freq.double().numpy(),
                               rtol=1e-6)
