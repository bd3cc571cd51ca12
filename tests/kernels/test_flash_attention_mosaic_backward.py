"""The Hopper (Mosaic GPU) flash-attention backward against the jnp reference's gradients.

On the CPU the kernel runs in Mosaic GPU's interpret mode (warpgroups, TMA, barriers and wgmma simulated; P^T
and dS^T staged through shared memory, dQ partials summed outside the kernel instead of TMA-reduced): dq, dk,
dv on small awkward shapes for both dQ splits, GQA / MQA, masks, soft-capping, plus `backward_supported`.
On a Hopper GPU (marked `gpu`): the real kernel at real sizes, alone and through the custom_vjp.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.flash_attention import mosaic_gpu
from llmjax.kernels.flash_attention import mosaic_gpu_backward as backward_module
from llmjax.kernels.flash_attention.reference import attention_mask, attention_reference


def random_inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    return q, k, v, d_out


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "logit_softcap"))
def reference(q, k, v, d_out, **masking):
    """float32 (out, lse [batch, heads, q_len] natural log, (dq, dk, dv)) of the jnp reference (jitted: one compile
    per shape instead of an op-by-op run, which took most of a GPU test's time at real sizes)."""
    q, k, v, d_out = (x.astype(jnp.float32) for x in (q, k, v, d_out))
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **masking), q, k, v)
        group = q.shape[2] // k.shape[2]
        scores = jnp.einsum("bshd,bthd->bhst", q, jnp.repeat(k, group, axis=2)) * q.shape[-1] ** -0.5
        if masking.get("logit_softcap") is not None:
            scores = masking["logit_softcap"] * jnp.tanh(scores / masking["logit_softcap"])
        mask = attention_mask(q.shape[1], k.shape[1], causal=masking["causal"],
                              sliding_window=masking.get("sliding_window"))
        lse = jax.nn.logsumexp(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
        return out, lse, vjp(d_out)


def relative_error(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def config_for(split, num_stages=None):
    """The split's config ("rows" at head_dim 128 fits shared memory with two stages only)."""
    num_stages = num_stages or (3 if split == "columns" else 2)
    return backward_module.BackwardConfig(dq_split=split, num_stages=num_stages)


# (causal, sliding_window, logit_softcap, q_len, kv_len, heads, kv_heads, head_dim, dq_split, num_stages): both
# splits, two and three stages; GQA (the CTA walks every query head of its group) and MQA; queries aligned to the
# end of longer keys (the first key tile sees no query block below its diagonal); non-causal with more keys than
# queries; a window that leaves key tiles with no query at all (dK = dV = 0 there) and masks both edges;
# soft-capping.
INTERPRET_CASES = [
    (True, None, None, 128, 128, 2, 1, 128, "columns", 3),
    (True, None, None, 64, 256, 4, 2, 128, "columns", 2),
    (False, None, None, 128, 256, 1, 1, 128, "rows", 2),
    (True, None, None, 128, 128, 2, 2, 64, "rows", 3),
    (True, 70, 5.0, 256, 256, 2, 1, 64, "rows", 2),
    (False, 100, None, 128, 384, 1, 1, 128, "columns", 2),
]


@pytest.mark.parametrize("causal,window,softcap,q_len,kv_len,heads,kv_heads,head_dim,split,stages", INTERPRET_CASES)
def test_interpret_matches_reference_gradients(causal, window, softcap, q_len, kv_len, heads, kv_heads, head_dim,
                                               split, stages):
    q, k, v, d_out = random_inputs(q_len + kv_len + head_dim, 1, q_len, kv_len, heads, kv_heads, head_dim)
    masking = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
    out, lse, want = reference(q, k, v, d_out, **masking)
    got = backward_module.flash_attention_backward_mosaic(
        q, k, v, out.astype(q.dtype), lse, d_out, config=config_for(split, stages), interpret=True, **masking)
    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert relative_error(g, w) < 1e-2, (name, relative_error(g, w))  # bf16 rounding is ~3e-3


def test_backward_supported_reasons():
    q, k, v, _ = random_inputs(0, 1, 256, 256, 4, 2, 128)

    def reason(q=q, k=k, v=v, **kwargs):
        return backward_module.backward_supported(q, k, v, **{"causal": True, **kwargs})

    assert reason() is None
    assert reason(causal=False, sliding_window=64, logit_softcap=30.0) is None
    assert "head_dim 256" in reason(*random_inputs(0, 1, 256, 256, 4, 2, 256)[:3])
    assert "segment ids" in reason(q_segment_ids=jnp.zeros((1, 256), jnp.int32))
    assert "q_len 96" in reason(q[:, :96])
    assert "kv_len 192" in reason(k=k[:, :192], v=v[:, :192], causal=False)
    assert "q_len 256 > kv_len 128" in reason(k=k[:, :128], v=v[:, :128])
    d64 = random_inputs(0, 1, 256, 256, 4, 2, 64)[:3]
    assert "columns" in reason(*d64, config=backward_module.BackwardConfig(dq_split="columns"))
    assert reason(*d64) is None  # the default for head_dim 64 splits by rows
    assert "shared memory" in reason(config=backward_module.BackwardConfig(dq_split="rows", num_stages=3))


def test_backward_choice():
    """"auto" takes the Hopper backward where it supports the call, Triton elsewhere; forcing one it cannot run
    is an error before tracing."""
    q, k, v, _ = random_inputs(0, 1, 256, 256, 4, 2, 128)
    masking = dict(causal=True, sliding_window=None, logit_softcap=None)
    assert mosaic_gpu.backward_for(q, k, v, backward="mosaic", **masking) == "mosaic"
    assert mosaic_gpu.backward_for(q, k, v, backward="triton", **masking) == "triton"
    # the backward's own limit is q_len % 64
    assert mosaic_gpu.backward_for(q[:, :192], k, v, backward="mosaic", **masking) == "mosaic"
    assert mosaic_gpu.backward_for(q, k[:, :192], v[:, :192], **{**masking, "causal": False}) == "triton"
    with pytest.raises(ValueError, match="backward='mosaic' cannot run"):
        mosaic_gpu.backward_for(q, k[:, :192], v[:, :192], backward="mosaic", **{**masking, "causal": False})
    # Up to 1024 keys, masked or at head_dim 64, Triton's backward measured faster on an H200.
    long_q, long_k, long_v, _ = random_inputs(0, 1, 2048, 2048, 4, 2, 128)
    assert mosaic_gpu.backward_for(long_q, long_k, long_v, **masking) == "mosaic"
    short_d64 = random_inputs(0, 1, 1024, 1024, 4, 2, 64)[:3]
    for causal in (True, False):
        assert mosaic_gpu.backward_for(*short_d64, **{**masking, "causal": causal}) == "triton"
    assert mosaic_gpu.backward_for(*short_d64, backward="mosaic", **masking) == "mosaic"
    assert mosaic_gpu.backward_for(q, k, v, **{**masking, "causal": False}) == "mosaic"  # unmasked d128
    with pytest.raises(ValueError, match="backward must be one of"):
        mosaic_gpu.backward_for(q, k, v, backward="cudnn", **masking)


def on_hopper():
    return mosaic_gpu._on_hopper()


GPU_CASES = [
    # (causal, sliding_window, logit_softcap, batch, q_len, kv_len, heads, kv_heads, head_dim, non-default configs):
    # one compile of the public path per case (the default backward), other schedules on one case each.
    (True, None, None, 1, 4096, 4096, 8, 8, 128, ("rows",)),
    (False, None, 30.0, 1, 2048, 2048, 8, 8, 128, ("three_stages",)),
    (True, 1000, None, 1, 1024, 2048, 16, 4, 128, ()),  # GQA, q_len < kv_len, a window
    (True, None, None, 2, 2048, 2048, 8, 1, 64, ()),  # MQA, head_dim 64
    (False, 300, None, 1, 1024, 3072, 8, 8, 64, ()),
]
GPU_CONFIGS = {
    "rows": backward_module.BackwardConfig(dq_split="rows"),
    "three_stages": backward_module.BackwardConfig(num_stages=3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("causal,window,softcap,batch,q_len,kv_len,heads,kv_heads,head_dim,others", GPU_CASES)
def test_gpu_matches_reference_gradients(causal, window, softcap, batch, q_len, kv_len, heads, kv_heads, head_dim,
                                         others):
    if not on_hopper():
        pytest.skip("needs a Hopper GPU")
    q, k, v, d_out = random_inputs(q_len + 7 * head_dim, batch, q_len, kv_len, heads, kv_heads, head_dim)
    masking = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
    _, _, want = reference(q, k, v, d_out, **masking)
    # The public path: the custom_vjp of flash_attention_mosaic, whose "auto" backward is this kernel here.
    got = jax.jit(lambda q, k, v, d: jax.vjp(lambda q, k, v: mosaic_gpu.flash_attention_mosaic(q, k, v, **masking),
                                             q, k, v)[1](d))(q, k, v, d_out)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert np.isfinite(np.asarray(g, np.float32)).all(), ("custom_vjp", name)
        assert relative_error(g, w) < 2e-2, ("custom_vjp", name, relative_error(g, w))
    for label in others:
        config = GPU_CONFIGS[label]

        def ours(q, k, v, d_out):
            out, lse = mosaic_gpu.flash_attention_forward_mosaic(q, k, v, **masking)
            return backward_module.flash_attention_backward_mosaic(q, k, v, out, lse, d_out, config=config,
                                                                   **masking)

        got = jax.jit(ours)(q, k, v, d_out)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert np.isfinite(np.asarray(g, np.float32)).all(), (label, name)
            assert relative_error(g, w) < 2e-2, (label, name, relative_error(g, w))
