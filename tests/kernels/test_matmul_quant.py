"""The fused dequantize-matmul kernel against the XLA reference: interpret mode on CPUs, real sizes on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.matmul_quant import MatmulTiles, quantized_matmul_pallas, quantized_matmul_reference
from llmjax.quant.formats import quantize


@pytest.mark.parametrize("fmt, group", [("int8", None), ("int4", 32), ("int4", None), ("int3", 64), ("nf4", 32)])
@pytest.mark.parametrize("rows", [1, 37])  # decode-shaped (padded to one 16-row tile) and prefill-shaped (3 tiles)
def test_interpret_matches_reference(fmt, group, rows):
    w = jax.random.normal(jax.random.key(0), (128, 72)) * 0.02  # N = 72: a partial column tile
    x = jax.random.normal(jax.random.key(1), (rows, 128))
    q = quantize(w, fmt, group)
    tiles = MatmulTiles(block_m=16, block_n=32, block_k=32, interpret=True)
    np.testing.assert_allclose(quantized_matmul_pallas(x, q, tiles=tiles), quantized_matmul_reference(x, q),
                               rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_and_batch_axes():
    w = jax.random.normal(jax.random.key(0), (64, 48)) * 0.02
    x = jax.random.normal(jax.random.key(1), (2, 3, 64)).astype(jnp.bfloat16)
    q = quantize(w, "int4", 32).with_matmul("pallas")
    out = x @ q  # QuantizedMatrix.__rmatmul__ through the kernel (interpret mode here)
    assert out.shape == (2, 3, 48) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), quantized_matmul_reference(x, q).astype(jnp.float32),
                               rtol=2e-2, atol=2e-3)


def test_bad_shapes():
    q = quantize(jnp.ones((64, 16)), "int8")
    with pytest.raises(ValueError, match="expects 64"):
        quantized_matmul_pallas(jnp.ones((1, 32)), q)
    with pytest.raises(ValueError, match="must divide the group size"):
        quantized_matmul_pallas(jnp.ones((1, 64)), quantize(jnp.ones((64, 16)), "int4", 32),
                                tiles=MatmulTiles(block_k=64, interpret=True))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("rows", [1, 8, 512])
def test_gpu_matches_reference(fmt, rows):
    k, n = 4096, 4096
    w = jax.random.normal(jax.random.key(0), (k, n)) * 0.02
    x = jax.random.normal(jax.random.key(1), (rows, k)).astype(jnp.bfloat16)
    q = quantize(w, fmt, 128 if fmt != "nf4" else 64)
    out = quantized_matmul_pallas(x, q).astype(jnp.float32)
    reference = quantized_matmul_reference(x.astype(jnp.float32), q)
    np.testing.assert_allclose(out, reference, rtol=3e-2, atol=3e-2)
