"""The Hopper (Mosaic GPU) flash-attention forward against the jnp reference.

On the CPU the kernel runs in Mosaic GPU's interpret mode (which simulates warpgroups, TMA, barriers and
wgmma; it runs the non-pipelined schedule, whose P V product stages P through shared memory): values and
lse on small awkward shapes, plus the `supported` logic. On a Hopper GPU (marked `gpu`): the real,
pipelined kernel at real sizes, and gradients through the custom_vjp.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.flash_attention import mosaic_gpu
from llmjax.kernels.flash_attention.reference import attention_mask, attention_reference


def random_qkv(key, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(key), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, v


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "logit_softcap"))
def reference_out_lse(q, k, v, *, causal, sliding_window=None, logit_softcap=None):
    """float32 out [batch, q_len, heads, head_dim] and natural-log lse [batch, heads, q_len]."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = attention_reference(q, k, v, causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap)
    group = q.shape[2] // k.shape[2]
    scores = jnp.einsum("bshd,bthd->bhst", q, jnp.repeat(k, group, axis=2)) * q.shape[-1] ** -0.5
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, sliding_window=sliding_window)
    lse = jax.nn.logsumexp(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
    return out, lse


def relative_error(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(y)


# (causal, sliding_window, logit_softcap, q_len, kv_len, heads, kv_heads, head_dim, pingpong): GQA and MQA,
# queries aligned to the end of longer keys, windows that leave whole blocks out (consumer 1 skips blocks
# consumer 0 needs, and with causal 64-key blocks consumer 0 skips consumer 1's last), both head dims,
# both ping-pong protocols (a miscounted barrier deadlocks or trips the interpreter's barrier checks).
INTERPRET_CASES = [
    (True, None, None, 128, 128, 2, 1, 64, "turn"),
    (True, None, None, 128, 256, 2, 2, 128, "rendezvous"),
    (False, None, None, 256, 192, 4, 2, 64, "turn"),
    (True, 70, None, 256, 256, 2, 1, 64, "turn"),
    (True, 70, None, 256, 256, 2, 1, 64, "rendezvous"),
    (False, None, 5.0, 128, 128, 2, 1, 64, "off"),
]


@pytest.mark.parametrize("causal,window,softcap,q_len,kv_len,heads,kv_heads,head_dim,pingpong", INTERPRET_CASES)
def test_interpret_matches_reference(causal, window, softcap, q_len, kv_len, heads, kv_heads, head_dim, pingpong):
    q, k, v = random_qkv(q_len + kv_len + head_dim, 1, q_len, kv_len, heads, kv_heads, head_dim)
    config = mosaic_gpu.KernelConfig(block_kv=64, num_stages=2, pipelined=False, pingpong=pingpong)
    out, lse = mosaic_gpu.flash_attention_forward_mosaic(
        q, k, v, causal=causal, sliding_window=window, logit_softcap=softcap, config=config, interpret=True)
    ref_out, ref_lse = reference_out_lse(q, k, v, causal=causal, sliding_window=window, logit_softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (1, heads, q_len) and lse.dtype == jnp.float32
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert relative_error(out, ref_out) < 1e-2  # bf16 output rounding is ~3e-3
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-3, rtol=0)


def test_lse_feeds_the_triton_backward():
    """The custom_vjp's contract: this forward's (out, lse) give the Triton backward the reference gradients."""
    triton = pytest.importorskip("llmjax.kernels.flash_attention.triton")
    q, k, v = random_qkv(3, 1, 128, 128, 2, 1, 64)
    d_out = jax.random.normal(jax.random.key(4), q.shape, q.dtype)
    config = mosaic_gpu.KernelConfig(block_kv=64, pipelined=False)
    out, lse = mosaic_gpu.flash_attention_forward_mosaic(q, k, v, causal=True, config=config, interpret=True)
    grads = triton.flash_attention_backward_triton(q, k, v, out, lse, d_out, causal=True, interpret=True)
    ref = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=True),
                  *(x.astype(jnp.float32) for x in (q, k, v)))[1](d_out.astype(jnp.float32))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
        assert relative_error(got, want) < 1e-2, name


def test_supported_reasons():
    q, k, v = random_qkv(0, 1, 256, 256, 4, 2, 128)

    def reason(q=q, k=k, v=v, **kwargs):
        return mosaic_gpu.supported(q, k, v, check_device=False, **{"causal": True, **kwargs})

    assert reason() is None
    assert reason(causal=False, sliding_window=64, logit_softcap=30.0) is None
    assert "head_dim 256" in reason(*random_qkv(0, 1, 256, 256, 4, 2, 256))
    assert "segment ids" in reason(q_segment_ids=jnp.zeros((1, 256), jnp.int32))
    assert "dtype" in reason(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert "q_len" in reason(q[:, :100])
    assert "kv_len" in reason(k=k[:, :200], v=v[:, :200], causal=False)
    assert "q_len 256 > kv_len 128" in reason(k=k[:, :128], v=v[:, :128])
    assert reason(k=k[:, :128], v=v[:, :128], causal=False) is None  # more queries than keys: fine unmasked
    assert "multiple of kv_heads" in reason(*random_qkv(0, 1, 256, 256, 4, 3, 128))


def test_supported_needs_hopper_off_gpu():
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    q, k, v = random_qkv(0, 1, 256, 256, 4, 4, 128)
    assert "Hopper" in mosaic_gpu.supported(q, k, v, causal=True)
    with pytest.raises(ValueError, match="Hopper"):
        mosaic_gpu.flash_attention_mosaic(q, k, v)


def on_hopper():
    return mosaic_gpu._on_hopper()


GPU_CASES = [
    # (causal, sliding_window, logit_softcap, q_len, kv_len, heads, kv_heads, head_dim)
    (True, None, None, 4096, 4096, 16, 16, 128),
    (False, None, None, 4096, 4096, 16, 16, 128),
    (True, None, None, 2048, 2048, 16, 4, 128),
    (True, None, None, 2048, 2048, 8, 1, 64),
    (False, None, None, 1024, 3072, 8, 8, 64),
    (True, None, None, 512, 2048, 8, 2, 128),
    (True, 1000, None, 2048, 2048, 8, 8, 128),
    (False, None, 30.0, 1024, 1024, 8, 8, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("causal,window,softcap,q_len,kv_len,heads,kv_heads,head_dim", GPU_CASES)
def test_gpu_matches_reference(causal, window, softcap, q_len, kv_len, heads, kv_heads, head_dim):
    if not on_hopper():
        pytest.skip("needs a Hopper GPU")
    q, k, v = random_qkv(q_len + 7 * head_dim, 2, q_len, kv_len, heads, kv_heads, head_dim)
    out, lse = jax.jit(lambda q, k, v: mosaic_gpu.flash_attention_forward_mosaic(
        q, k, v, causal=causal, sliding_window=window, logit_softcap=softcap))(q, k, v)
    ref_out, ref_lse = reference_out_lse(q, k, v, causal=causal, sliding_window=window, logit_softcap=softcap)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert relative_error(out, ref_out) < 1e-2
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,head_dim,kv_heads", [(True, 128, 2), (False, 64, 4)])
def test_gpu_gradients_through_custom_vjp(causal, head_dim, kv_heads):
    if not on_hopper():
        pytest.skip("needs a Hopper GPU")
    q, k, v = random_qkv(head_dim, 1, 512, 512, 4, kv_heads, head_dim)
    d_out = jax.random.normal(jax.random.key(9), q.shape, q.dtype)

    def grads(attention, *args):
        return jax.vjp(lambda q, k, v: attention(q, k, v, causal=causal), *args)[1](d_out.astype(args[0].dtype))

    ours = jax.jit(lambda q, k, v: grads(mosaic_gpu.flash_attention_mosaic, q, k, v))(q, k, v)
    ref = grads(attention_reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, got, want in zip(("dq", "dk", "dv"), ours, ref):
        assert got.shape == want.shape and got.dtype == q.dtype, name  # the reference ran in float32
        assert relative_error(got, want) < 2e-2, name


def fp8_qkv(key, q_len, kv_len, heads, kv_heads):
    """float8_e4m3fn q, k, v (head_dim 128, scale = amax / 448 per tensor), their scales, and the float32 values
    they stand for."""
    tensors = random_qkv(key, 1, q_len, kv_len, heads, kv_heads, 128, jnp.float32)
    scales = [jnp.max(jnp.abs(x)) / 448.0 for x in tensors]
    quantized = [(x / s).astype(jnp.float8_e4m3fn) for x, s in zip(tensors, scales)]
    return quantized, scales, [x.astype(jnp.float32) * s for x, s in zip(quantized, scales)]


# (causal, sliding_window, logit_softcap, q_len, kv_len, heads, kv_heads): GQA, queries at the end of longer keys
FP8_CASES = [
    (True, None, None, 256, 384, 4, 2),
    (False, None, None, 128, 256, 2, 1),
    (True, 100, None, 256, 256, 2, 2),
    (False, None, 5.0, 128, 128, 2, 1),
]


@pytest.mark.parametrize("causal,window,softcap,q_len,kv_len,heads,kv_heads", FP8_CASES)
def test_fp8_forward_interpret_matches_reference(causal, window, softcap, q_len, kv_len, heads, kv_heads):
    """Against the float32 attention of the values the e4m3 operands stand for: what is left is P rounded to
    e4m3 (3 mantissa bits, a relative error of at most 1/16 per weight: about 2% of the output measured). A
    wrong scale (q's without k's, or v's left out) is off by far more."""
    (q, k, v), scales, values = fp8_qkv(q_len + kv_len, q_len, kv_len, heads, kv_heads)
    masking = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
    config = mosaic_gpu.KernelConfig(block_kv=128, num_stages=2, pipelined=False, pingpong="rendezvous")
    out = mosaic_gpu.flash_attention_fp8_forward(q, k, v, *scales, config=config, interpret=True, **masking)
    ref = attention_reference(*values, **masking)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    assert relative_error(out, ref) < 0.04
    v_t = jnp.transpose(v, (0, 2, 3, 1))  # a cache kept as V^T gives the same result
    out_t = mosaic_gpu.flash_attention_fp8_forward(q, k, v_t, *scales, v_transposed=True, config=config,
                                                   interpret=True, **masking)
    np.testing.assert_array_equal(np.asarray(out_t, np.float32), np.asarray(out, np.float32))


def test_fp8_supported_reasons():
    (q, k, v), _, _ = fp8_qkv(0, 256, 256, 4, 2)

    def reason(q=q, k=k, v=v, **kwargs):
        return mosaic_gpu.supported_fp8(q, k, v, check_device=False, **{"causal": True, **kwargs})

    assert reason() is None
    assert "float8_e4m3fn" in reason(q.astype(jnp.bfloat16))
    assert "head_dim 128 only" in reason(*(x[..., :64] for x in (q, k, v)))
    assert "q_len 256 > kv_len 128" in reason(k=k[:, :128], v=v[:, :128])
    with pytest.raises(ValueError, match="flash_attention_fp8_forward: .*float8_e4m3fn"):
        mosaic_gpu.flash_attention_fp8_forward(q.astype(jnp.bfloat16), k, v, 1.0, 1.0, 1.0, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,kv_heads", [(True, 16), (False, 4)])
def test_gpu_fp8_forward_matches_reference(causal, kv_heads):
    """The real kernel (P rounded to e4m3 and staged through shared memory) at a real
    size against the float32 attention of the values the operands stand for."""
    if not on_hopper():
        pytest.skip("needs a Hopper GPU")
    (q, k, v), scales, values = fp8_qkv(5, 2048, 2048, 16, kv_heads)
    out = jax.jit(functools.partial(mosaic_gpu.flash_attention_fp8_forward, causal=causal))(q, k, v, *scales)
    ref = attention_reference(*values, causal=causal)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert relative_error(out, ref) < 0.04


@pytest.mark.gpu
def test_gpu_fp8_attention_impl():
    """attention_impl="pallas_fp8": the inputs quantized per tensor, the FP8 forward, the output in the inputs'
    dtype; no gradient (one clear error); a call the kernel cannot take (head_dim 64) runs 'pallas' with a warning."""
    if not on_hopper():
        pytest.skip("needs a Hopper GPU")
    from llmjax.model.attention import dot_product_attention

    q, k, v = random_qkv(11, 2, 1024, 1024, 8, 2, 128)
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True, impl="pallas_fp8"))(q, k, v)
    assert out.dtype == q.dtype
    assert relative_error(out, attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)) < 0.07
    with pytest.raises(ValueError, match="has no gradient"):
        jax.grad(lambda q: dot_product_attention(q, k, v, impl="pallas_fp8").astype(jnp.float32).sum())(q)
    q64, k64, v64 = random_qkv(12, 1, 256, 256, 4, 4, 64)
    with pytest.warns(UserWarning, match="using 'pallas'"):
        dot_product_attention(q64, k64, v64, impl="pallas_fp8")


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_hardware_kernels_lower_for_cuda_on_any_host(monkeypatch, fp8, causal):
    """The hardware schedules (pipelined, P in registers for bf16; P staged in shared memory for FP8), which
    interpret mode does not run, lowered for CUDA here: Mosaic GPU's layout inference runs at lowering, so a
    register layout it cannot satisfy fails on the CPU too (the first FP8 kernel, P cast to e4m3 in registers as
    the P V product's operand, failed exactly so on the H100)."""
    monkeypatch.setattr(mosaic_gpu, "_on_hopper", lambda: True)
    dtype = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    q = jax.ShapeDtypeStruct((1, 1024, 4, 128), dtype)
    k = jax.ShapeDtypeStruct((1, 1024, 2, 128), dtype)
    if fp8:
        def attention(q, k, v):
            return mosaic_gpu.flash_attention_fp8_forward(q, k, v, 1.0, 1.0, 1.0, causal=causal)
    else:
        def attention(q, k, v):
            return mosaic_gpu.flash_attention_forward_mosaic(q, k, v, causal=causal)[0]
    text = jax.jit(attention).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
