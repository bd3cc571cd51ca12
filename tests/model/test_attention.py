"""Attention core and masks against a float64 NumPy reference that repeats K/V heads explicitly."""

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.model.attention import attention_mask, xla_attention


def reference_mask(q_len, kv_len, causal, window, q_seg, kv_seg):
    mask = np.ones((q_seg.shape[0], q_len, kv_len), bool)
    for b in range(q_seg.shape[0]):
        for i in range(q_len):
            qi = i + kv_len - q_len
            for j in range(kv_len):
                if causal and j > qi:
                    mask[b, i, j] = False
                if window is not None and qi - j >= window:
                    mask[b, i, j] = False
                if q_seg[b, i] != kv_seg[b, j]:
                    mask[b, i, j] = False
    return mask


def reference_attention(q, k, v, mask):
    """float64, loops over heads, K/V heads repeated to match the query heads."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for head in range(h):
        kh = head // group
        scores = np.einsum("bsd,btd->bst", q[:, :, head], k[:, :, kh]) / np.sqrt(d)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bst,btd->bsd", probs, v[:, :, kh])
    return out


@pytest.mark.parametrize("q_len,kv_len", [(13, 13), (3, 13), (1, 9)])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 4)])
@pytest.mark.parametrize("with_segments", [False, True])
def test_mask_matches_loops(q_len, kv_len, causal, window, with_segments):
    rng = np.random.default_rng(0)
    kv_seg = np.sort(rng.integers(0, 3, size=(2, kv_len)), axis=1) if with_segments else np.zeros((2, kv_len), int)
    q_seg = kv_seg[:, kv_len - q_len:]
    got = attention_mask(q_len, kv_len, causal=causal, sliding_window=window,
                         q_segment_ids=jnp.asarray(q_seg) if with_segments else None,
                         kv_segment_ids=jnp.asarray(kv_seg) if with_segments else None)
    want = reference_mask(q_len, kv_len, causal, window, q_seg, kv_seg)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), want.shape), want)


@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (6, 2), (6, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("head_dim", [8, 24])
def test_xla_attention_matches_reference(heads, kv_heads, head_dim):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, s = 2, 11
    q = rng.standard_normal((b, s, heads, head_dim))
    k = rng.standard_normal((b, s, kv_heads, head_dim))
    v = rng.standard_normal((b, s, kv_heads, head_dim))
    seg = np.sort(rng.integers(0, 2, size=(b, s)), axis=1)
    mask = attention_mask(s, s, causal=True, sliding_window=5, q_segment_ids=jnp.asarray(seg))
    got = xla_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), mask)
    want = reference_attention(q, k, v, np.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
