"""The split-K decode attention kernel (interpret mode) against the jnp reference: values, GQA / MQA,
ragged cache lengths, left padding, sliding windows over a wrapped cache, int8 caches, soft-capping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.decode_attention import decode_attention, decode_attention_reference
from llmjax.infer.kv_cache import quantize


def case(batch, heads, kv_heads, head_dim, capacity, *, seed=0, left_pad=False, wrapped=False, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, head_dim)), dtype)
    lengths = rng.integers(1, capacity + 1, batch)
    positions = np.full((batch, capacity), -1)
    for row, n in enumerate(lengths):
        if wrapped:  # a ring buffer that went round: slot s holds the latest position = s mod capacity
            total = n + capacity + 3
            for p in range(total):
                positions[row, p % capacity] = p
            lengths[row] = capacity
        elif left_pad:
            positions[row, capacity - n:] = np.arange(n)
            lengths[row] = capacity
        else:
            positions[row, :n] = np.arange(n)
    q_positions = positions.max(axis=1)
    return q, k, v, jnp.asarray(positions), jnp.asarray(q_positions), jnp.asarray(lengths)


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,capacity,options", [
    (3, 6, 2, 8, 37, {}),                                   # GQA, awkward sizes
    (2, 4, 4, 16, 100, {"sliding_window": 7}),              # MHA, window
    (2, 8, 1, 32, 70, {"left_pad": True}),                  # MQA, left padding
    (2, 6, 3, 16, 24, {"wrapped": True, "sliding_window": 24}),  # a wrapped sliding-window cache
    (1, 4, 2, 16, 50, {"logit_softcap": 5.0}),
])
def test_kernel_matches_reference(batch, heads, kv_heads, head_dim, capacity, options):
    options = dict(options)
    layout = {k: options.pop(k) for k in ("left_pad", "wrapped") if k in options}
    q, k, v, positions, q_positions, lengths = case(batch, heads, kv_heads, head_dim, capacity, **layout)
    want = decode_attention_reference(q, k, v, positions, q_positions, **options)
    got = decode_attention(q, k, v, positions, q_positions, lengths, block_k=16, splits=3, interpret=True, **options)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_int8_cache_dequantizes_in_the_kernel():
    q, k, v, positions, q_positions, lengths = case(2, 8, 2, 16, 45, seed=3)
    kq, k_scale = quantize(k)
    vq, v_scale = quantize(v)
    want = decode_attention_reference(q, kq, vq, positions, q_positions, k_scale=k_scale, v_scale=v_scale)
    got = decode_attention(q, kq, vq, positions, q_positions, lengths, k_scale=k_scale, v_scale=v_scale,
                           block_k=16, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    exact = decode_attention_reference(q, k, v, positions, q_positions)
    assert np.abs(np.asarray(got) - np.asarray(exact)).max() < 0.05  # int8 error stays small


def test_reference_equals_dense_attention_of_the_visible_keys():
    """Independent check of the reference: per row, softmax over exactly the visible keys."""
    q, k, v, positions, q_positions, _ = case(2, 4, 2, 8, 20, seed=5)
    out = np.asarray(decode_attention_reference(q, k, v, positions, q_positions, sliding_window=6))
    for b in range(2):
        pos = np.asarray(positions[b])
        visible = (pos >= 0) & (pos <= int(q_positions[b])) & (int(q_positions[b]) - pos < 6)
        for h in range(4):
            kk, vv = np.asarray(k[b, visible, h // 2]), np.asarray(v[b, visible, h // 2])
            s = kk @ np.asarray(q[b, h]) / np.sqrt(8)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[b, h], (p / p.sum()) @ vv, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_kernel_on_gpu_at_real_size(kv_dtype):
    q, k, v, positions, q_positions, lengths = case(4, 32, 8, 64, 2048, seed=7, dtype=jnp.bfloat16)
    scales = {}
    if kv_dtype == "int8":
        k, ks = quantize(k)
        v, vs = quantize(v)
        scales = dict(k_scale=ks, v_scale=vs)
    want = decode_attention_reference(q, k, v, positions, q_positions, **scales).astype(jnp.float32)
    got = jax.jit(lambda *a: decode_attention(*a, **scales))(q, k, v, positions, q_positions, lengths)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)
