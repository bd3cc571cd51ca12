"""The jnp attention reference and its masks against float64 NumPy loops that repeat K/V heads explicitly;
and how the model picks an attention implementation."""

import jax.numpy as jnp
import numpy as np
import pytest

import warnings

from llmjax.kernels.flash_attention.reference import attention_mask, attention_reference
from llmjax.model.attention import dot_product_attention, resolve_attention_impl


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


def reference_attention(q, k, v, mask, softcap=None):
    """float64, loops over heads, K/V heads repeated to match the query heads."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for head in range(h):
        kh = head // group
        scores = np.einsum("bsd,btd->bst", q[:, :, head], k[:, :, kh]) / np.sqrt(d)
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
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
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_reference_attention_matches_loops(heads, kv_heads, head_dim, softcap):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, s = 2, 11
    q = rng.standard_normal((b, s, heads, head_dim))
    k = rng.standard_normal((b, s, kv_heads, head_dim))
    v = rng.standard_normal((b, s, kv_heads, head_dim))
    seg = np.sort(rng.integers(0, 2, size=(b, s)), axis=1)
    got = attention_reference(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), causal=True, sliding_window=5,
                              q_segment_ids=jnp.asarray(seg), logit_softcap=softcap)
    mask = reference_mask(s, s, True, 5, seg, seg)
    want = reference_attention(q, k, v, mask, softcap)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_auto_is_the_reference_on_cpu_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_attention_impl("auto", "cpu") == "xla"


@pytest.mark.parametrize("impl", ["cudnn", "pallas", "pallas_fp8"])
def test_gpu_implementations_fall_back_on_cpu_with_a_warning(impl):
    resolve_attention_impl.cache_clear()
    with pytest.warns(UserWarning, match=f"'{impl}' attention needs a CUDA GPU, this is 'cpu'; using the 'xla'"):
        assert resolve_attention_impl(impl, "cpu") == "xla"
    q = jnp.ones((1, 4, 2, 8))
    with pytest.warns(UserWarning):
        resolve_attention_impl.cache_clear()
        out = dot_product_attention(q, q, q, impl=impl)
    np.testing.assert_allclose(out, attention_reference(q, q, q))


def test_cudnn_without_softcap_support_falls_back():
    resolve_attention_impl.cache_clear()
    with pytest.warns(UserWarning, match="cuDNN attention has no logit soft-capping"):
        assert resolve_attention_impl("cudnn", "gpu", 30.0) == "xla"


def test_cudnn_with_an_unsupported_head_dim_falls_back():
    resolve_attention_impl.cache_clear()
    with pytest.warns(UserWarning, match="cuDNN attention needs head_dim a multiple of 8 up to 256, got 12"):
        assert resolve_attention_impl("auto", "gpu", None, 12) == "xla"
    assert resolve_attention_impl("auto", "gpu", None, 128) == "cudnn"
    assert resolve_attention_impl("auto", "gpu", None, 128, "bfloat16") == "cudnn"
    assert resolve_attention_impl("auto", "gpu", None, 128, "float32") == "xla"  # cuDNN takes half precision only
    with pytest.warns(UserWarning, match="cuDNN attention needs bfloat16 or float16 inputs, got float32"):
        assert resolve_attention_impl("cudnn", "gpu", None, 128, "float32") == "xla"
