"""Quantize / dequantize error bounds per format, packing, the NF4 codebook, double quantization, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.quant.formats import (
    NF4_CODEBOOK,
    QuantizationError,
    concatenate_outputs,
    dequantize,
    pack_3bit,
    pack_4bit,
    quantize,
    quantized_matmul,
    unpack_3bit,
    unpack_4bit,
)


def weights(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 0.02


def test_pack_unpack_round_trip():
    codes = jax.random.randint(jax.random.key(0), (3, 10, 7), 0, 16).astype(jnp.uint8)
    packed = pack_4bit(codes)
    assert packed.shape == (3, 5, 7) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_4bit(packed), codes)
    assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | (int(codes[0, 1, 0]) << 4)  # low nibble first


def test_pack_unpack_3bit_round_trip():
    codes = jax.random.randint(jax.random.key(0), (2, 24, 5), 0, 8).astype(jnp.uint8)
    packed = pack_3bit(codes)
    assert packed.shape == (2, 9, 5)  # eight 3-bit codes in three bytes
    np.testing.assert_array_equal(unpack_3bit(packed), codes)
    word = int(packed[0, 0, 0]) | int(packed[0, 3, 0]) << 8 | int(packed[0, 6, 0]) << 16  # byte planes of word 0
    assert [(word >> (3 * i)) & 7 for i in range(8)] == [int(c) for c in codes[0, :8, 0]]


def test_nf4_codebook_is_normal_quantiles():
    """QLoRA's construction: quantiles of N(0, 1) (offset 0.9677), 8 positive and 7 negative, an exact zero."""
    from jax.scipy.special import ndtri

    offset = 0.9677083
    positive = ndtri(jnp.linspace(offset, 0.5, 9)[:-1])
    negative = -ndtri(jnp.linspace(offset, 0.5, 8)[:-1])
    values = jnp.sort(jnp.concatenate([positive, jnp.zeros(1), negative]))
    np.testing.assert_allclose(values / jnp.abs(values).max(), NF4_CODEBOOK, atol=1e-6)


@pytest.mark.parametrize("fmt, group, bound", [
    ("int8", None, 0.5 / 127), ("int8", 16, 0.5 / 127),   # half a step of absmax / 127
    ("int4", None, 0.5 / 15 * 2), ("int4", 16, 0.5 / 15 * 2),  # half a step of (max - min) / 15 <= 2 absmax / 15
    ("int3", 16, 0.5 / 7 * 2),
    ("nf4", 16, 0.5 * 0.3 * 1.01),  # half the widest NF4 gap (1 - 0.723 ~ 0.28), plus double-quant slack
])
def test_round_trip_error_bounds(fmt, group, bound):
    w = weights((2, 64, 3, 8))  # [layers, in, heads, head_dim]
    q = quantize(w, fmt, group, in_dims=1, lead_dims=1)
    back = dequantize(q)
    assert back.shape == w.shape
    matrix = w.reshape(2, 64 // (group or 64), group or 64, 24)
    absmax = jnp.abs(matrix).max(axis=2, keepdims=True)  # per group and output channel
    error = jnp.abs(back.reshape(matrix.shape) - matrix)
    assert bool(jnp.all(error <= bound * absmax + 1e-7)), float((error / absmax).max())


def test_sizes_and_packing():
    w = weights((256, 64))
    assert quantize(w, "int8").codes.shape == (256, 64)
    q4 = quantize(w, "int4", 128)
    assert q4.codes.shape == (128, 64) and q4.codes.dtype == jnp.uint8
    # 4 bits per weight plus a float16 scale and a uint8 zero per group of 128
    assert q4.nbytes == 256 * 64 // 2 + 2 * 64 * (2 + 1)
    nf4 = quantize(w, "nf4")  # group 64, scales double-quantized to int8
    assert nf4.scales is None and nf4.scale_codes.dtype == jnp.int8
    assert nf4.nbytes < 256 * 64 // 2 + 4 * 64 * 1 + 4 * 64  # below 4 + 8 / 64 + 32 / 64 bits per weight
    q3 = quantize(w, "int3", 128)
    assert q3.codes.shape == (96, 64) and q3.nbytes == 256 * 64 * 3 // 8 + 2 * 64 * (2 + 1)


def test_double_quantization_is_accurate():
    w = weights((128, 512))
    q = quantize(w, "nf4", 64)
    from llmjax.quant.formats import nf4_absmax

    absmax = jnp.abs(w.reshape(2, 64, 512)).max(axis=1)
    np.testing.assert_allclose(nf4_absmax(q), absmax, rtol=0.02, atol=1e-5)


def test_matmul_reference_and_rmatmul():
    w, x = weights((96, 40)), jax.random.normal(jax.random.key(1), (5, 96))
    q = quantize(w, "int4", 32)
    expected = x @ dequantize(q)
    np.testing.assert_allclose(quantized_matmul(x, q), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x @ q, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda x, q: x @ q)(x, q), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_concatenate_outputs(fmt):
    a, b = weights((64, 24), 1), weights((64, 40), 2)
    qa, qb = quantize(a, fmt, 32), quantize(b, fmt, 32)
    cat = concatenate_outputs([qa, qb])
    expected = jnp.concatenate([dequantize(qa), dequantize(qb)], axis=1)
    # nf4 re-quantizes its (int8) scales in new blocks: a change far below its own 4-bit error
    tolerance = 5e-3 * float(jnp.abs(expected).max()) if fmt == "nf4" else 0
    np.testing.assert_allclose(dequantize(cat), expected, atol=tolerance + 1e-7)


def test_bad_group_size_and_format():
    with pytest.raises(QuantizationError, match="does not divide the input dimension 96"):
        quantize(weights((96, 8)), "int4", 128)
    with pytest.raises(QuantizationError, match="unknown quantization format"):
        quantize(weights((96, 8)), "int5")
    with pytest.raises(QuantizationError, match="multiple of 8"):
        quantize(weights((96, 8)), "int3", 12)
    with pytest.raises(QuantizationError, match="must be even"):
        quantize(weights((93, 8)), "int4", 31)
