"""scaled_dot_product_attention against a float64 NumPy reference (K/V heads repeated, every mask
written out) and torch's scaled_dot_product_attention (gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.nn import attention_mask, scaled_dot_product_attention

torch = pytest.importorskip("torch")


def numpy_attention(q, k, v, mask=None, bias=None, causal=False, scale=None, softcap=None):
    """[b, s, h, d] layout; K/V repeated per query head; -inf masking; fully masked rows -> 0."""
    b, s, h, d = q.shape
    t, kv = k.shape[1], k.shape[2]
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) * (d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    allowed = np.ones((b, h, s, t), bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask, allowed.shape)
    if causal:
        allowed &= np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s)
    scores = np.where(allowed, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    weights = np.where(allowed, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
    total = weights.sum(-1, keepdims=True)
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.einsum("bhst,bthd->bshd", probs, v)


def inputs(rng, batch=2, q_len=5, kv_len=7, heads=6, kv_heads=2, head_dim=9, v_dim=9):
    return (rng.normal(size=(batch, q_len, heads, head_dim)), rng.normal(size=(batch, kv_len, kv_heads, head_dim)),
            rng.normal(size=(batch, kv_len, kv_heads, v_dim)))


CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "mask_per_head": dict(mask=lambda rng: rng.random((2, 6, 5, 7)) < 0.7),
    "mask_2d_and_causal": dict(mask=lambda rng: rng.random((5, 7)) < 0.8, causal=True),
    "bias_broadcast_over_batch": dict(bias=lambda rng: rng.normal(size=(1, 6, 5, 7))),
    "bias_and_mask_and_scale": dict(bias=lambda rng: rng.normal(size=(2, 1, 5, 7)),
                                    mask=lambda rng: rng.random((2, 1, 1, 7)) < 0.8, scale=0.3),
    "softcap": dict(softcap=2.0, causal=True),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_reference(rng, case):
    q, k, v = inputs(rng, v_dim=4)
    options = {name: value(rng) if callable(value) else value for name, value in CASES[case].items()}
    ours = dict(options)
    if "softcap" in ours:
        ours["logit_softcap"] = ours.pop("softcap")
    got = scaled_dot_product_attention(*map(jnp.asarray, (q, k, v)), **{n: jnp.asarray(x) if isinstance(x, np.ndarray)
                                                                       else x for n, x in ours.items()})
    np.testing.assert_allclose(got, numpy_attention(q, k, v, **options), rtol=1e-11, atol=1e-13)


def test_fully_masked_rows_are_zero(rng):
    q, k, v = inputs(rng)
    mask = rng.random((2, 6, 5, 7)) < 0.6
    mask[0, :, 2] = False  # query 2 of batch 0 sees nothing, in every head
    mask[1, 3, 4] = False  # one head of one query
    got = scaled_dot_product_attention(*map(jnp.asarray, (q, k, v)), mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got)[0, 2], 0.0)
    np.testing.assert_array_equal(np.asarray(got)[1, 4, 3], 0.0)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, mask=mask), rtol=1e-11, atol=1e-13)
    grads = jax.grad(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=jnp.asarray(mask)).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0])[0, 2], 0.0)


@pytest.mark.parametrize("kind", ["bool_mask", "float_bias", "causal"])
def test_gradients_match_torch(rng, kind):
    q, k, v = inputs(rng, q_len=6, kv_len=6)
    mask = rng.random((2, 6, 6, 6)) < 0.7
    mask[..., 0] = True  # no fully masked row: torch gives NaN there
    bias = rng.normal(size=(2, 6, 6, 6))
    cotangent = rng.normal(size=q.shape)
    options = {"bool_mask": dict(mask=jnp.asarray(mask)), "float_bias": dict(bias=jnp.asarray(bias)),
               "causal": dict(causal=True)}[kind]
    grads = jax.grad(lambda q, k, v: jnp.sum(scaled_dot_product_attention(q, k, v, **options) * cotangent),
                     argnums=(0, 1, 2))(q, k, v)

    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    attn_mask = {"bool_mask": torch.tensor(mask), "float_bias": torch.tensor(bias), "causal": None}[kind]
    out = torch.nn.functional.scaled_dot_product_attention(
        tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2), attn_mask=attn_mask, is_causal=kind == "causal",
        enable_gqa=True).transpose(1, 2)
    (out * torch.tensor(cotangent)).sum().backward()
    np.testing.assert_allclose(scaled_dot_product_attention(q, k, v, **options), out.detach().numpy(), rtol=1e-10)
    for ours, theirs in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-9, atol=1e-11)


def test_segment_masks_from_attention_mask(rng):
    """The model's masks (causal + segments) are a boolean mask like any other."""
    q, k, v = inputs(rng, q_len=7, kv_len=7)
    segments = jnp.asarray([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
    mask = attention_mask(7, 7, causal=True, q_segment_ids=segments)[:, None]  # [batch, 1, q, k]
    got = scaled_dot_product_attention(*map(jnp.asarray, (q, k, v)), mask=mask)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, mask=np.asarray(mask)), rtol=1e-11, atol=1e-13)


def test_bfloat16_inputs(rng):
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in inputs(rng))
    got = scaled_dot_product_attention(q, k, v, causal=True)
    assert got.dtype == jnp.bfloat16
    want = numpy_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), causal=True)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=3e-2)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(mask=jnp.ones((2, 5, 7), bool)), ValueError,
         r"mask must have rank 2 \(\[q_len, kv_len\]\) or 4 \(broadcastable to \[batch, heads, q_len, kv_len\]\), "
         r"got shape \[2, 5, 7\]; for a \[batch, q_len, kv_len\] mask pass mask\[:, None\]"),
        (dict(mask=jnp.ones((2, 4, 5, 7), bool)), ValueError,
         r"mask of shape \[2, 4, 5, 7\] does not broadcast to \[batch, heads, q_len, kv_len\] = \[2, 6, 5, 7\]"),
        (dict(mask=jnp.ones((5, 7))), TypeError, r"mask must be boolean \(True = may attend\), got float"),
        (dict(bias=jnp.ones((5, 8))), ValueError, r"bias of shape \[1, 1, 5, 8\] does not broadcast"),
    ],
)
def test_bad_masks_are_one_clear_error(rng, options, error, message):
    q, k, v = map(jnp.asarray, inputs(rng))
    with pytest.raises(error, match=message):
        scaled_dot_product_attention(q, k, v, **options)


def test_bad_shapes_are_one_clear_error(rng):
    q, k, v = map(jnp.asarray, inputs(rng))
    with pytest.raises(ValueError, match=r"q has 6 heads, not a multiple of k's 4 kv heads"):
        scaled_dot_product_attention(q, jnp.ones((2, 7, 4, 9)), jnp.ones((2, 7, 4, 9)))
    with pytest.raises(ValueError, match=r"q \[2, 5, 6, 9\] and k \[2, 7, 2, 8\] must agree in batch and head_dim"):
        scaled_dot_product_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, head_dim\], got shape \[5, 6, 9\]"):
        scaled_dot_product_attention(q[0], k, v)
