"""Quantize / dequantize error bounds per format, packing, the NF4 codebook, double quantization, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.quant.formats import (
    BITS,
    NF4_CODEBOOK,
    QuantizationError,
    QuantizedMatrix,
    concatenate_outputs,
    dequantize,
    pack_3bit,
    pack_4bit,
    pack_codes,
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


# --- offsets: w = code * scale + offset (GGUF's Q4_1 and the K-quants' "min" forms) ---

def q4_1_parts(out_features, in_features, seed=0, bits=4):
    """Random Q4_1 content in GGUF's orientation: codes uint8 [out, in] < 2^bits, d and m float16 [out, in / 32]."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (out_features, in_features)).astype(np.uint8)
    blocks = (out_features, in_features // 32)
    d = (rng.random(blocks) * 0.02 + 1e-4).astype(np.float16)
    m = (-rng.random(blocks) * 0.15 + 0.01).astype(np.float16)  # mostly negative minimums, some positive
    return codes, d, m


def offset_matrix(codes, d, m, fmt="int4", group=32) -> QuantizedMatrix:
    """QuantizedMatrix of codes [*lead, out, in] with d, m [*lead, out, in / group] (GGUF's orientation)."""
    swap = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731  [..., out, in] -> [..., in, out]
    return QuantizedMatrix(pack_codes(jnp.asarray(swap(codes)), BITS[fmt]),
                           scales=jnp.asarray(swap(d)), offsets=jnp.asarray(swap(m)), format=fmt, group_size=group,
                           shape=(codes.shape[-1], codes.shape[-2]))


def q4_1_bytes(codes, d, m) -> np.ndarray:
    """GGUF's Q4_1 blocks [out, in / 32 * 20] uint8: per block d, m (float16) and 16 bytes holding elements j (low
    nibble) and j + 16 (high nibble)."""
    blocks = codes.reshape(*d.shape, 32)
    packed = blocks[..., :16] | (blocks[..., 16:] << 4)
    return np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), packed], axis=-1).reshape(
        codes.shape[0], -1)


@pytest.mark.parametrize("fmt", ["int4", "int8", "int3"])
def test_offsets_dequantize_bit_exact_numpy(fmt):
    """code * scale + offset in float32, in that order: bit-equal to NumPy, eagerly and under jit, any int format."""
    codes, d, m = q4_1_parts(40, 96, seed=1, bits=BITS[fmt])
    qm = offset_matrix(codes, d, m, fmt)
    expected = (codes.astype(np.float32) * np.repeat(d, 32, axis=1).astype(np.float32)
                + np.repeat(m, 32, axis=1).astype(np.float32)).T  # [in, out]
    np.testing.assert_array_equal(dequantize(qm), expected)
    np.testing.assert_array_equal(jax.jit(dequantize)(qm), expected)
    assert qm.nbytes == qm.codes.size + 2 * 2 * 40 * 3  # codes + float16 scales and offsets, 3 groups x 40 columns


def test_offsets_match_gguf_q4_1_dequantizer():
    """Q4_1 blocks built with NumPy, dequantized by the gguf package's own reference, equal ours bit for bit."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    codes, d, m = q4_1_parts(24, 160, seed=2)  # 5 blocks per row
    reference = gguf_dequantize(q4_1_bytes(codes, d, m), GGMLQuantizationType.Q4_1)  # [out, in] float32
    assert reference.shape == (24, 160) and reference.dtype == np.float32
    qm = offset_matrix(codes, d, m)
    np.testing.assert_array_equal(dequantize(qm), reference.T)
    np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(qm), reference.T)


def test_offsets_matmul_reference():
    """x @ qm (the XLA reference) is x @ the dequantized matrix: the same float32 dot, bit-equal; bf16 inputs
    dequantize to bf16 first (within bf16 rounding)."""
    codes, d, m = q4_1_parts(40, 96, seed=3)
    qm = offset_matrix(codes, d, m)
    x = jax.random.normal(jax.random.key(1), (2, 5, 96))
    expected = jnp.matmul(x, dequantize(qm), preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(quantized_matmul(x, qm), expected)
    np.testing.assert_array_equal(x @ qm, expected)
    np.testing.assert_array_equal(jax.jit(lambda x, q: x @ q)(x, qm), expected)
    x16 = x.astype(jnp.bfloat16)
    out = x16 @ qm
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), x16.astype(jnp.float32) @ dequantize(qm), rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(expected).max()))


def test_offsets_stacked_layers_under_scan():
    """A [layers, in, out] stack with offsets is a pytree with the offsets as a child: sliced per layer by scan."""
    parts = [q4_1_parts(16, 64, seed=s) for s in range(3)]
    codes, d, m = (np.stack(p) for p in zip(*parts))  # [layers, out, in], [layers, out, in / 32]
    stacked = offset_matrix(codes, d, m)
    assert stacked.lead_shape == (3,) and stacked.offsets.shape == (3, 2, 16)
    assert sum(leaf is stacked.offsets for leaf in jax.tree.leaves(stacked)) == 1
    x = jax.random.normal(jax.random.key(0), (4, 64))

    @jax.jit
    def run(x, stacked):
        def layer(carry, qm):  # qm: one layer's QuantizedMatrix [in, out]
            return carry, carry @ qm
        return jax.lax.scan(layer, x, stacked)[1]  # [layers, 4, out]

    expected = jnp.stack([x @ offset_matrix(*p).dequantize() for p in parts])
    np.testing.assert_array_equal(run(x, stacked), expected)
    np.testing.assert_array_equal(dequantize(stacked)[1], dequantize(offset_matrix(*parts[1])))


def test_offsets_concatenate_outputs():
    a, b = offset_matrix(*q4_1_parts(24, 64, seed=4)), offset_matrix(*q4_1_parts(40, 64, seed=5))
    cat = concatenate_outputs([a, b])
    assert cat.offsets.shape == (2, 64) and cat.zeros is None
    np.testing.assert_array_equal(dequantize(cat), jnp.concatenate([dequantize(a), dequantize(b)], axis=1))
    with pytest.raises(QuantizationError, match="all store offsets"):
        concatenate_outputs([a, quantize(weights((64, 8)), "int4", 32)])


def test_offsets_bad_combinations():
    qm = quantize(weights((64, 8)), "int4", 32)  # has zero points
    offsets = jnp.zeros(qm.scales.shape, jnp.float16)
    with pytest.raises(QuantizationError, match="either zeros .* or offsets"):
        QuantizedMatrix(qm.codes, scales=qm.scales, zeros=qm.zeros, offsets=offsets, format="int4", group_size=32,
                        shape=(64, 8))
    nf4 = quantize(weights((64, 8)), "nf4", 32)
    with pytest.raises(QuantizationError, match="no offsets for nf4"):
        QuantizedMatrix(nf4.codes, offsets=offsets, scale_codes=nf4.scale_codes, scale_blocks=nf4.scale_blocks,
                        scale_mean=nf4.scale_mean, format="nf4", group_size=32, shape=(64, 8))
