"""FAVOR+ (llmjax.nn.performer): the random projection, the unbiased softmax-kernel estimator, causal prefix sums
against the dense masked formula (values and gradients), convergence to exact attention, and the model's
attention_impl="performer". Runs under tests/nn's float64 (conftest), float32 where said."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.flash_attention.reference import attention_reference
from llmjax.nn.performer import (fixed_projection, orthogonal_random_features, performer_attention,
                                 performer_attention_dense, performer_projection, softmax_kernel_features)

ROOT = Path(__file__).resolve().parents[2]


def inputs(seed=0, batch=2, q_len=21, kv_len=21, heads=4, kv_heads=2, head_dim=8, scale=0.5, dtype=jnp.float64):
    """q [batch, q_len, heads, d], k, v [batch, kv_len, kv_heads, d]; q and k scaled down so that the softmax kernel
    estimator's variance (which grows as exp(|q|^2 + |k|^2)) stays small at test sizes."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = scale * jax.random.normal(kq, (batch, q_len, heads, head_dim), dtype)
    k = scale * jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, v


def test_blocks_are_orthogonal_with_chi_norms():
    d, m = 8, 20  # 3 blocks: 8 + 8 + 4 rows
    projection = np.asarray(orthogonal_random_features(jax.random.key(3), m, d, jnp.float64))
    assert projection.shape == (m, d)
    norms = np.linalg.norm(projection, axis=1)
    for start in range(0, m, d):
        unit = projection[start:start + d] / norms[start:start + d, None]
        np.testing.assert_allclose(unit @ unit.T, np.eye(len(unit)), atol=1e-12)
    assert not np.allclose(norms, norms[0])  # rescaled by independent chi_d norms, not all equal
    # chi_d has mean ~ sqrt(d - 1/2): over many rows the mean norm is close to it
    many = np.linalg.norm(np.asarray(orthogonal_random_features(jax.random.key(4), 4096, d, jnp.float64)), axis=1)
    assert abs(many.mean() - np.sqrt(d - 0.5)) < 0.05
    np.testing.assert_array_equal(performer_projection(20, d, jax.random.key(3), jnp.float64), projection)


def test_projection_reads_the_config_and_redraws_with_a_new_key():
    from llmjax.config import get_config

    cfg = get_config("llama-tiny", attention_impl="performer", performer_features=64)
    first = performer_projection(cfg, cfg.head_dim, jax.random.key(0))
    assert first.shape == (64, cfg.head_dim) and first.dtype == jnp.float32
    assert not np.allclose(first, performer_projection(cfg, cfg.head_dim, jax.random.key(1)))
    np.testing.assert_array_equal(fixed_projection(64, cfg.head_dim), first)


def test_softmax_kernel_estimator_is_unbiased():
    """The mean over N independent draws of phi(x) . phi(y) is within 5 standard errors of exp(x . y). Each draw's
    estimate is an average of M features, and draws are independent, so by the central limit theorem the mean of N
    draws is ~Gaussian with standard error std(draws) / sqrt(N): a 5-sigma miss has probability ~6e-7 (and the seed
    is fixed). The bound is also tight enough to catch a bias: the relative standard error here is ~1.5%, so a 10%
    bias (e.g. a stabilizer or a 1/sqrt(M) that did not cancel) would miss by more than 6 standard errors."""
    d, m, draws = 8, 16, 4000
    x = 0.4 * jax.random.normal(jax.random.key(10), (d,), jnp.float64)
    y = 0.4 * jax.random.normal(jax.random.key(11), (d,), jnp.float64)
    exact = float(jnp.exp(x @ y))

    def estimate(key):
        projection = orthogonal_random_features(key, m, d, jnp.float64)
        return softmax_kernel_features(x, projection) @ softmax_kernel_features(y, projection)

    samples = np.asarray(jax.vmap(estimate)(jax.random.split(jax.random.key(12), draws)))
    standard_error = samples.std() / np.sqrt(draws)
    assert abs(samples.mean() - exact) < 5 * standard_error
    assert standard_error < 0.02 * exact


def test_stabilizers_cancel_exactly():
    """The per-row query max and the global key max are constant factors of numerator and denominator: the output
    equals the ratio computed with unstabilized features."""
    q, k, v = inputs()
    projection = orthogonal_random_features(jax.random.key(0), 32, 8, jnp.float64)
    phi_q = softmax_kernel_features(q.reshape(2, 21, 2, 2, 8) * 8**-0.25, projection)  # [b, s, kv, g, M]
    phi_k = softmax_kernel_features(k * 8**-0.25, projection)  # [b, t, kv, M]
    scores = jnp.einsum("bskgm,btkm->bskgt", phi_q, phi_k)
    expected = (jnp.einsum("bskgt,btkv->bskgv", scores, v) / scores.sum(-1, keepdims=True)).reshape(2, 21, 4, 8)
    np.testing.assert_allclose(performer_attention(q, k, v, projection), expected, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_approaches_softmax_attention_as_features_grow(causal):
    q, k, v = inputs(q_len=33, kv_len=33)
    exact = attention_reference(q, k, v, causal=causal)
    errors = []
    for m in (16, 256, 4096):
        per_seed = []
        for seed in range(2):
            out = performer_attention(q, k, v, orthogonal_random_features(jax.random.key(seed), m, 8, jnp.float64),
                                      causal=causal)
            per_seed.append(float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)))
        errors.append(np.mean(per_seed))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.06, errors  # the error falls as ~1/sqrt(M): ~0.04 at M=4096 for these inputs


@pytest.mark.parametrize("q_len,kv_len", [(21, 21), (5, 21), (1, 9)])
def test_causal_prefix_sums_equal_the_dense_masked_formula(q_len, kv_len):
    q, k, v = inputs(q_len=q_len, kv_len=kv_len)
    projection = orthogonal_random_features(jax.random.key(1), 24, 8, jnp.float64)
    expected = performer_attention_dense(q, k, v, projection, causal=True)
    for chunk in (1, 4, 7, 64):  # 7 does not divide 21: padded
        got = performer_attention(q, k, v, projection, causal=True, chunk=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-11, err_msg=f"chunk={chunk}")
    # and the dense formula written out here, for one row: query i (aligned to the end) over keys j <= i + offset
    phi_q = softmax_kernel_features(q[0, -1, 3] * 8**-0.25, projection)
    phi_k = softmax_kernel_features(k[0, :, 1] * 8**-0.25, projection)
    weights = phi_k @ phi_q  # [kv_len]: every key visible to the last query
    np.testing.assert_allclose(expected[0, -1, 3], weights @ v[0, :, 1] / weights.sum(), rtol=1e-11)


def test_float32_inputs_match_the_dense_formula_and_chunks_agree():
    q, k, v = inputs(q_len=50, kv_len=50, dtype=jnp.float32)
    projection = orthogonal_random_features(jax.random.key(1), 64, 8)
    expected = performer_attention_dense(q, k, v, projection, causal=True)
    outs = [performer_attention(q, k, v, projection, causal=True, chunk=c) for c in (8, 16, 50, 128)]
    for out in outs:
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-6)


def test_bfloat16_inputs_accumulate_in_float32_and_return_bfloat16():
    q, k, v = inputs(q_len=40, kv_len=40, dtype=jnp.float32)
    projection = orthogonal_random_features(jax.random.key(1), 64, 8)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = performer_attention(*low, projection, causal=True, chunk=16)
    assert out.dtype == jnp.bfloat16
    expected = performer_attention_dense(*[x.astype(jnp.float32) for x in low], projection, causal=True)
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=2e-2)  # bf16 rounding of the output only


def test_causal_gradients_match_the_dense_masked_formula():
    q, k, v = inputs(q_len=19, kv_len=19)
    projection = orthogonal_random_features(jax.random.key(2), 16, 8, jnp.float64)
    cotangent = jax.random.normal(jax.random.key(5), q.shape, jnp.float64)

    def loss(fn, **kw):
        return lambda q, k, v: jnp.sum(fn(q, k, v, projection, causal=True, **kw) * cotangent)

    got = jax.grad(loss(performer_attention, chunk=5), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(performer_attention_dense), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


def test_bad_arguments_are_one_clear_error():
    q, k, v = inputs()
    projection = orthogonal_random_features(jax.random.key(0), 16, 8)
    with pytest.raises(ValueError, match=r"projection \[16, 4\] must be \[num_features, head_dim=8\]"):
        performer_attention(q, k, v, projection[:, :4])
    with pytest.raises(ValueError, match="chunk=0 must be a positive integer"):
        performer_attention(q, k, v, projection, chunk=0)
    with pytest.raises(ValueError, match="causal with q_len=21 > kv_len=9"):
        performer_attention(q, k[:, :9], v[:, :9], projection, causal=True)
    with pytest.raises(ValueError, match="num_features=0 must be a positive integer"):
        orthogonal_random_features(jax.random.key(0), 0, 8)


def test_model_with_performer_attention_runs_forward_and_backward():
    from llmjax.config import get_config
    from llmjax.model import forward, init_params

    with jax.enable_x64(False):
        cfg = get_config("llama-tiny", attention_impl="performer", performer_features=64)
        params = init_params(cfg, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)

        def loss(params):
            logits = forward(params, tokens, cfg)[:, :-1, :cfg.vocab_size]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        assert np.isfinite(value)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        exact = forward(params, tokens, cfg.replace(attention_impl="xla"))
        assert not np.allclose(forward(params, tokens, cfg), exact)  # an approximation, not a silent fallback

        segments = jnp.ones((2, 24), jnp.int32)
        with pytest.raises(ValueError, match="attention_impl='performer' .* supports no segment ids"):
            forward(params, tokens, cfg, segment_ids=segments)
        with pytest.raises(ValueError, match="attention_impl='performer' .* supports no sliding_window"):
            forward(params, tokens, cfg.replace(sliding_window=8))
        with pytest.raises(ValueError, match="attention_impl='performer' .* supports no logit_softcap"):
            forward(params, tokens, cfg.replace(attn_logit_softcap=30.0))


@pytest.mark.slow  # ~20 s of CPU (two jit compilations per measurement)
def test_bench_performer_quick_smoke(tmp_path):
    out = tmp_path / "performer.json"
    result = subprocess.run([sys.executable, "-m", "experiments", "bench_performer", "--quick", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "crossover" in result.stdout
    assert out.exists() and out.with_suffix(".png").exists()
