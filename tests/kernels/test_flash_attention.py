"""Our flash attention (Pallas, Triton lowering) against the jnp reference: values and gradients wrt q, k, v
in Pallas interpret mode on the CPU at awkward small sizes; block-range arithmetic against the mask; input
checks; kernel dispatch; the autotuner's cache. GPU-marked tests repeat the comparison at real sizes."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.flash_attention import BlockSizes, KernelConfig, attention_mask, attention_reference, flash_attention
from llmjax.kernels.flash_attention import autotune
from llmjax.kernels.flash_attention import triton as fa_triton

F32_TOLERANCE = 1e-4  # relative (Frobenius norm) error, float32 inputs
HALF_TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3}  # half inputs against the float32 reference of upcast inputs


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def packed_segments(rng, batch: int, length: int, documents: int = 3) -> np.ndarray:
    """Sorted document ids, as sequence packing writes them: [batch, length]."""
    return np.sort(rng.integers(0, documents, size=(batch, length)), axis=1).astype(np.int32)


def make_inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], (batch, q_len, heads, head_dim), dtype)
    return q, k, v, d_out


def visible_rows(q_len, kv_len, batch, masking) -> jax.Array:
    """[batch, q_len, 1, 1] True where the query sees at least one key (elsewhere the kernel returns zeros,
    the reference a uniform average)."""
    mask = attention_mask(q_len, kv_len, causal=masking["causal"], sliding_window=masking["sliding_window"],
                          q_segment_ids=masking["q_segment_ids"], kv_segment_ids=masking["kv_segment_ids"])
    return jnp.broadcast_to(mask.any(-1), (batch, q_len))[:, :, None, None]


def value_and_vjp(attention):
    """jit(q, k, v, d_out -> (out, (dq, dk, dv))): one compilation per test instead of op-by-op dispatch."""

    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(d_out)

    return jax.jit(run)


def check_against_reference(q, k, v, d_out, masking, *, tolerance, block_sizes=None, interpret=True,
                            implementation=None):
    """Output and (q, k, v) gradients of flash_attention vs attention_reference on float32 upcasts, with
    the cotangent zeroed on rows that see no key; those rows must come out exactly zero."""
    batch, q_len = q.shape[:2]
    live = visible_rows(q_len, k.shape[1], batch, masking)
    d_out = jnp.where(live, d_out, 0)
    segments = dict(q_segment_ids=masking["q_segment_ids"], kv_segment_ids=masking["kv_segment_ids"])
    static = {key: value for key, value in masking.items() if key not in segments}

    def kernel(q, k, v, segments):
        return flash_attention(q, k, v, block_sizes=block_sizes, interpret=interpret,
                               implementation=implementation, **static, **segments)

    def reference(q, k, v, segments):
        return attention_reference(q, k, v, **static, **segments)

    upcast = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    with jax.default_matmul_precision("highest"):
        want, want_grads = value_and_vjp(functools.partial(reference, segments=segments))(*upcast)
    got, got_grads = value_and_vjp(functools.partial(kernel, segments=segments))(q, k, v, d_out)
    assert got.dtype == q.dtype and got.shape == q.shape
    got = got.astype(jnp.float32)
    assert bool(jnp.isfinite(got).all())
    assert relative_error(jnp.where(live, got, 0), jnp.where(live, want, 0)) < tolerance
    assert bool((jnp.where(live, 0, got) == 0).all()), "rows with no visible key must be zero"
    for name, got_grad, want_grad, like in zip("qkv", got_grads, want_grads, (q, k, v)):
        assert got_grad.dtype == like.dtype and got_grad.shape == like.shape, name
        assert bool(jnp.isfinite(got_grad.astype(jnp.float32)).all()), name
        error = relative_error(got_grad.astype(jnp.float32), want_grad)
        assert error < tolerance, f"d{name}: relative error {error:.2e}"


def masking_args(rng, batch, q_len, kv_len, *, causal=True, window=None, segments=False, softcap=None):
    kv_seg = packed_segments(rng, batch, kv_len) if segments else None
    q_seg = None if kv_seg is None else kv_seg[:, kv_len - q_len:] if kv_len >= q_len else None
    return dict(causal=causal, sliding_window=window, logit_softcap=softcap,
                q_segment_ids=None if q_seg is None else jnp.asarray(q_seg),
                kv_segment_ids=None if kv_seg is None else jnp.asarray(kv_seg))


# name: (batch, q_len, kv_len, heads, kv_heads, head_dim, blocks, masking options)
FLOAT32_CASES = {
    "causal_tail": (1, 45, 45, 2, 2, 64, (16, 16), dict()),
    "full_gqa": (2, 40, 40, 4, 2, 64, (16, 32), dict(causal=False)),
    "mqa_chunked_prefill": (1, 24, 56, 4, 1, 64, (16, 16), dict()),
    "segments_gqa": (2, 48, 48, 4, 2, 64, (16, 16), dict(segments=True)),
    "sliding_window": (1, 50, 50, 2, 1, 64, (16, 16), dict(window=9)),
    "window_full_softcap": (1, 37, 37, 2, 2, 32, (16, 16), dict(causal=False, window=6, softcap=2.0)),
    "softcap": (1, 33, 33, 2, 2, 64, (16, 32), dict(softcap=1.5)),
    "head_dim_128": (1, 33, 33, 2, 1, 128, (16, 16), dict()),
    "head_dim_256": (1, 20, 20, 2, 1, 256, (16, 16), dict()),
    "head_dim_80_padded": (1, 24, 24, 2, 2, 80, (16, 16), dict(causal=False)),
    "decode": (2, 1, 37, 4, 2, 64, (16, 16), dict()),
    "everything": (2, 29, 61, 6, 2, 32, (16, 16), dict(window=20, segments=True, softcap=3.0)),
}


@pytest.mark.parametrize("case", list(FLOAT32_CASES))
def test_float32_matches_reference(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, blocks, options = FLOAT32_CASES[case]
    rng = np.random.default_rng(len(case))
    q, k, v, d_out = make_inputs(len(case), batch, q_len, kv_len, heads, kv_heads, head_dim, jnp.float32)
    masking = masking_args(rng, batch, q_len, kv_len, **options)
    check_against_reference(q, k, v, d_out, masking, tolerance=F32_TOLERANCE, block_sizes=BlockSizes.fixed(*blocks))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_matches_float32_reference(dtype):
    rng = np.random.default_rng(3)
    q, k, v, d_out = make_inputs(3, 2, 40, 40, 4, 2, 64, jnp.dtype(dtype))
    masking = masking_args(rng, 2, 40, 40, segments=True)
    check_against_reference(q, k, v, d_out, masking, tolerance=HALF_TOLERANCE[dtype],
                            block_sizes=BlockSizes.fixed(32, 32))


def test_rows_without_keys_are_zero_with_finite_gradients():
    """Query segments absent from the keys, and q_len > kv_len with causal: no NaN anywhere."""
    q, k, v, d_out = make_inputs(5, 1, 20, 16, 2, 2, 32, jnp.float32)
    q_seg = jnp.asarray(np.r_[np.full(8, 7), np.zeros(12)][None].astype(np.int32))  # segment 7: no keys
    kv_seg = jnp.zeros((1, 16), jnp.int32)
    masking = dict(causal=True, sliding_window=None, logit_softcap=None, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    check_against_reference(q, k, v, d_out, masking, tolerance=F32_TOLERANCE, block_sizes=BlockSizes.fixed(16, 16))


def test_default_blocks_under_jit_and_grad():
    """No block_sizes: interpret mode picks the fixed small blocks; works under jit(grad)."""
    q, k, v, _ = make_inputs(7, 1, 40, 40, 2, 1, 32, jnp.float32)

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v) ** 2)

    kernel = functools.partial(flash_attention, interpret=True)
    got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
    with jax.default_matmul_precision("highest"):
        want = jax.grad(functools.partial(loss, attention_reference), argnums=(0, 1, 2))(q, k, v)
    for got_grad, want_grad in zip(got, want):
        assert relative_error(got_grad, want_grad) < F32_TOLERANCE


def test_forward_and_backward_functions_share_the_lse_layout():
    """flash_attention_forward_triton's lse is [batch, heads, q_len] float32 natural log-sum-exp."""
    q, k, v, d_out = make_inputs(11, 2, 24, 40, 4, 2, 32, jnp.float32)
    blocks = BlockSizes.fixed(16, 16)
    out, lse = fa_triton.flash_attention_forward_triton(q, k, v, causal=True, block_sizes=blocks, interpret=True)
    assert lse.shape == (2, 4, 24) and lse.dtype == jnp.float32
    group = 2
    scores = jnp.einsum("bshd,bthd->bhst", q, k[:, :, jnp.arange(4) // group], precision="highest") * 32**-0.5
    mask = attention_mask(24, 40, causal=True)[:, None]
    want_lse = jax.nn.logsumexp(jnp.where(mask, scores, -jnp.inf), axis=-1)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    grads = fa_triton.flash_attention_backward_triton(q, k, v, out, lse, d_out, causal=True, block_sizes=blocks,
                                                      interpret=True)
    with jax.default_matmul_precision("highest"):
        want_grads = jax.vjp(attention_reference, q, k, v)[1](d_out)
    for got_grad, want_grad in zip(grads, want_grads):
        assert relative_error(got_grad, want_grad) < F32_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# Block ranges: every visible pair lies in [lo, hi); blocks in [mid_lo, mid_hi) are fully visible.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_len,kv_len", [(48, 48), (20, 72), (40, 24)])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 13), (False, 7)])
def test_block_ranges_cover_the_mask(q_len, kv_len, causal, window):
    block_q, block_k = 16, 8
    masking = fa_triton.Masking(causal, window, None, q_len, kv_len, 1.0)
    mask = np.asarray(attention_mask(q_len, kv_len, causal=causal, sliding_window=window)[0])
    q_blocks, kv_blocks = -(-q_len // block_q), -(-kv_len // block_k)
    padded = np.zeros((q_blocks * block_q, kv_blocks * block_k), bool)
    padded[:q_len, :kv_len] = mask
    any_visible = padded.reshape(q_blocks, block_q, kv_blocks, block_k).any(axis=(1, 3))
    for i in range(q_blocks):
        lo, mid_lo, mid_hi, hi = map(int, fa_triton.kv_block_range(i * block_q, block_q, block_k, kv_blocks, masking))
        rows = slice(i * block_q, min((i + 1) * block_q, q_len))
        for j in range(kv_blocks):
            block = padded[rows, j * block_k:(j + 1) * block_k]
            if block.any():
                assert lo <= j < hi, (i, j)
            if mid_lo <= j < mid_hi:
                assert block.all() and (j + 1) * block_k <= kv_len, (i, j)
    for j in range(kv_blocks):
        lo, mid_lo, mid_hi, hi = map(int, fa_triton.q_block_range(j * block_k, block_q, block_k, q_blocks, masking))
        for i in range(q_blocks):
            if any_visible[i, j]:
                assert lo <= i < hi, (i, j)
            if mid_lo <= i < mid_hi:
                rows = slice(i * block_q, min((i + 1) * block_q, q_len))
                assert padded[rows, j * block_k:(j + 1) * block_k].all(), (i, j)


# ---------------------------------------------------------------------------------------------------------
# Input checks: one clear message each, raised before any kernel is traced.
# ---------------------------------------------------------------------------------------------------------


def _arrays(q_shape=(1, 8, 4, 64), kv_shape=(1, 8, 2, 64), dtype=jnp.float32, v_shape=None):
    return (jnp.zeros(q_shape, dtype), jnp.zeros(kv_shape, dtype), jnp.zeros(v_shape or kv_shape, dtype))


BAD_INPUTS = {
    "head_dim": (dict(arrays=_arrays((1, 8, 4, 72), (1, 8, 2, 72))), "head_dim must be a multiple of 16 in \\[16, 256\\], got 72"),
    "head_dim_large": (dict(arrays=_arrays((1, 8, 4, 512), (1, 8, 2, 512))), "got 512"),
    "dtype": (dict(arrays=_arrays(dtype=jnp.int32)), "dtype must be bfloat16, float16 or float32, got int32"),
    "mixed_dtype": (dict(arrays=(jnp.zeros((1, 8, 4, 64), jnp.bfloat16), *_arrays()[1:])), "share one dtype"),
    "rank": (dict(arrays=(jnp.zeros((8, 4, 64)), *_arrays()[1:])), "q must be 4-D .* got shape \\(8, 4, 64\\)"),
    "kv_mismatch": (dict(arrays=_arrays(v_shape=(1, 9, 2, 64))), "k and v must have the same shape"),
    "head_dim_mismatch": (dict(arrays=_arrays(kv_shape=(1, 8, 2, 32))), "k head_dim must equal q head_dim 64, got 32"),
    "batch_mismatch": (dict(arrays=_arrays(kv_shape=(2, 8, 2, 64))), "k batch must equal q batch 1, got 2"),
    "heads": (dict(arrays=_arrays(kv_shape=(1, 8, 3, 64))), "heads must be a multiple of .* heads 4 and kv_heads 3"),
    "window": (dict(sliding_window=0), "sliding_window must be None or an int >= 1 .* got 0"),
    "softcap": (dict(logit_softcap=-1.0), "logit_softcap must be None or a number > 0, got -1.0"),
    "causal": (dict(causal=None), "causal must be a bool, got None"),
    "segment_shape": (dict(q_segment_ids=jnp.zeros((1, 9), jnp.int32)),
                      "q_segment_ids must have shape \\[batch, len\\] = \\(1, 8\\), got \\(1, 9\\)"),
    "segment_dtype": (dict(q_segment_ids=jnp.zeros((1, 8), jnp.float32)), "q_segment_ids must be an integer array, got float32"),
    "kv_segments_alone": (dict(kv_segment_ids=jnp.zeros((1, 8), jnp.int32)), "kv_segment_ids needs q_segment_ids"),
    "kv_segment_shape": (dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32), kv_segment_ids=jnp.zeros((1, 7), jnp.int32)),
                         "kv_segment_ids must have shape .* \\(1, 8\\), got \\(1, 7\\)"),
    "implementation": (dict(implementation="cuda"), "implementation must be None, 'mosaic' or 'triton', got 'cuda'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(case):
    options, message = BAD_INPUTS[case]
    options = dict(options)
    arrays = options.pop("arrays", _arrays())
    with pytest.raises(ValueError, match=message):
        flash_attention(*arrays, interpret=True, **options)


def test_segments_required_when_lengths_differ():
    q, k, v = _arrays(kv_shape=(1, 12, 2, 64))
    with pytest.raises(ValueError, match="kv_segment_ids .* is required when q_len \\(8\\) differs from kv_len \\(12\\)"):
        flash_attention(q, k, v, q_segment_ids=jnp.zeros((1, 8), jnp.int32), interpret=True)


def test_cpu_without_interpret_says_how():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the kernel runs")
    with pytest.raises(ValueError, match="need a CUDA GPU.*interpret=True"):
        flash_attention(*_arrays())


# ---------------------------------------------------------------------------------------------------------
# Dispatch to the Hopper kernel, and the autotuner.
# ---------------------------------------------------------------------------------------------------------


class FakeMosaic:
    def __init__(self, reason=None):
        self.reason, self.calls = reason, 0

    def supported(self, q, k, v, **masking):
        return self.reason

    def flash_attention_mosaic(self, q, k, v, **masking):
        self.calls += 1
        return q


def test_mosaic_dispatch(monkeypatch):
    import llmjax.kernels.flash_attention as fa
    q, k, v = _arrays(q_shape=(1, 8, 2, 128), kv_shape=(1, 8, 2, 128))
    monkeypatch.setattr(fa, "_mosaic_module", lambda: None)
    assert "not available" in fa.mosaic_unavailable_reason(q, k, v)
    fake = FakeMosaic()
    monkeypatch.setattr(fa, "_mosaic_module", lambda: fake)
    monkeypatch.setattr(fa, "_compute_capability", lambda: "8.0")
    assert "Hopper" in fa.mosaic_unavailable_reason(q, k, v)
    monkeypatch.setattr(fa, "_compute_capability", lambda: "9.0")
    assert fa.mosaic_unavailable_reason(q, k, v) is None
    monkeypatch.setattr(fa, "compute_platform", lambda *inputs: "gpu")  # as if placed on a GPU
    assert fa.flash_attention(q, k, v) is q and fake.calls == 1
    fake.reason = "no soft-capping"
    with pytest.raises(ValueError, match="implementation='mosaic' cannot run this call: no soft-capping"):
        fa.flash_attention(q, k, v, implementation="mosaic")
    # interpret / block sizes choose the Triton kernel without asking Mosaic
    out = fa.flash_attention(q, k, v, interpret=True, block_sizes=BlockSizes.fixed(16, 16))
    assert out.shape == q.shape and fake.calls == 1
    # head_dim 64 over at most 1024 keys: the Triton kernels (measured faster), unless Mosaic is forced
    fake.reason = None
    q64, k64, v64 = _arrays(q_shape=(1, 8, 2, 64))
    monkeypatch.setattr(fa, "flash_attention_triton", lambda q, *args, **kwargs: "triton")
    assert fa.flash_attention(q64, k64, v64) == "triton" and fake.calls == 1
    assert fa.flash_attention(q64, k64, v64, implementation="mosaic") is q64 and fake.calls == 2


def test_autotune_candidates_and_interpret_config():
    for which in autotune.KERNELS:
        for head_dim in (16, 64, 80, 128, 256):
            for dtype in (jnp.bfloat16, jnp.float32):
                configs = autotune.candidates(which, head_dim, dtype)
                assert configs and all(isinstance(c, KernelConfig) for c in configs)
    q, k, _ = _arrays()
    masking = fa_triton.make_masking(q, k, causal=True, sliding_window=None, logit_softcap=None)
    assert autotune.config_for("forward", q, k, masking, interpret=True) == autotune.INTERPRET_CONFIG
    assert autotune.length_class(1) == 128 and autotune.length_class(4097) == 8192


def test_autotune_runs_kernels_on_concrete_arrays_inside_a_jit_trace(monkeypatch, tmp_path):
    """The tuner is reached while the caller traces; its timing runs must still execute (not trace)."""
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", {})
    monkeypatch.setattr(autotune, "_on_gpu", lambda: True)
    monkeypatch.setattr(autotune, "_device_kind", lambda: "test")
    seen = []

    def time_on_device(which, config, q, k, masking, forward=None):
        result = jax.jit(lambda x: x * 2)(jnp.ones(3))
        seen.append(isinstance(result, jax.core.Tracer))
        return float(jnp.sum(result)) * config.block_q

    @jax.jit
    def traced(q, k):
        masking = fa_triton.make_masking(q, k, causal=True, sliding_window=None, logit_softcap=None)
        config = autotune.config_for("forward", q, k, masking, time_candidate=time_on_device)
        return q * config.block_q

    q, k, _ = _arrays(dtype=jnp.bfloat16)
    traced(q, k)
    assert seen and not any(seen)


def test_autotune_times_once_and_caches_in_json(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", {})
    monkeypatch.setattr(autotune, "_on_gpu", lambda: True)
    monkeypatch.setattr(autotune, "_device_kind", lambda: "NVIDIA H200")
    timed = []

    def fake_time(which, config, q, k, masking, forward=None):
        if which != "dq":
            return 1.0
        assert forward == autotune.candidates("forward", 64, jnp.bfloat16)[0]  # tuned before the backward
        timed.append(config)
        if config.num_stages == 3:
            raise RuntimeError("out of shared memory")  # failing candidates are skipped
        return config.block_q * 1e-3 + config.block_k * 1e-6

    q, k, _ = _arrays(dtype=jnp.bfloat16)
    masking = fa_triton.make_masking(q, k, causal=True, sliding_window=None, logit_softcap=None)
    best = autotune.config_for("dq", q, k, masking, time_candidate=fake_time)
    configs = autotune.candidates("dq", 64, jnp.bfloat16)
    assert best == min((c for c in configs if c.num_stages != 3), key=lambda c: c.block_q * 1e3 + c.block_k)
    assert len(timed) == len(configs)
    entries = json.loads((tmp_path / autotune.CACHE_FILE).read_text())["entries"]
    assert entries["dq|NVIDIA H200|bfloat16|d64|causal|q128|kv128"] == [best.block_q, best.block_k, best.num_warps,
                                                                        best.num_stages]
    assert set(entries) == {"dq|NVIDIA H200|bfloat16|d64|causal|q128|kv128",
                            "forward|NVIDIA H200|bfloat16|d64|causal|q128|kv128"}
    assert autotune.config_for("dq", q, k, masking, time_candidate=fake_time) == best  # memory
    assert len(timed) == len(configs)
    monkeypatch.setattr(autotune, "_memory", {})
    assert autotune.config_for("dq", q, k, masking, time_candidate=fake_time) == best  # file
    assert len(timed) == len(configs)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(autotune, "_memory", {})
    assert autotune.config_for("forward", q, k, masking) == autotune.candidates("forward", 64, jnp.bfloat16)[0]


# ---------------------------------------------------------------------------------------------------------
# Real sizes on the GPU (skipped on CPU).
# ---------------------------------------------------------------------------------------------------------


GPU_CASES = {
    "causal_gqa_segments": (2, 2048, 2048, 8, 2, 128, dict(segments=True)),
    "full_mha_d64": (2, 1024, 1024, 8, 8, 64, dict(causal=False)),
    "window_softcap_mqa": (1, 1536, 1536, 8, 1, 128, dict(window=256, softcap=30.0)),
    "chunked_prefill": (2, 512, 1536, 8, 4, 128, dict()),
    "tail_d256": (1, 1000, 1000, 4, 2, 256, dict()),
}


@pytest.fixture
def default_configs(monkeypatch):
    """GPU tests check the default (first-candidate) configs, without timing candidates."""
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_bfloat16_matches_reference(case, default_configs):
    batch, q_len, kv_len, heads, kv_heads, head_dim, options = GPU_CASES[case]
    rng = np.random.default_rng(0)
    q, k, v, d_out = make_inputs(0, batch, q_len, kv_len, heads, kv_heads, head_dim, jnp.bfloat16)
    masking = masking_args(rng, batch, q_len, kv_len, **options)
    check_against_reference(q, k, v, d_out, masking, tolerance=HALF_TOLERANCE["bfloat16"], interpret=False,
                            implementation="triton")


@pytest.mark.gpu
def test_gpu_triton_float32_and_float16(default_configs):
    rng = np.random.default_rng(1)
    for dtype, tolerance in ((jnp.float32, 1e-3), (jnp.float16, HALF_TOLERANCE["float16"])):
        q, k, v, d_out = make_inputs(1, 1, 777, 777, 4, 2, 80, dtype)
        masking = masking_args(rng, 1, 777, 777, segments=True, window=300)
        check_against_reference(q, k, v, d_out, masking, tolerance=tolerance, interpret=False,
                                implementation="triton")
