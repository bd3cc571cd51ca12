"""kernels.cpu_qmatvec: the CPU int8 custom call against NumPy float64 of the same math (activations quantized to
int8 blocks of 32) and against the float product on the dequantized matrix, packing round trips, the fallback
without a compiler, and a whole quantized decode through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import get_config
from llmjax.kernels import cpu_qmatvec
from llmjax.kernels import matmul_quant
from llmjax.kernels.matmul_quant import QuantizedMatrix, quantized_matvec, resolve_quantized_matmul
from llmjax.quant.formats import QuantizationError, dequantize, quantize


def int8_matrix(k: int, n: int, group: int, seed: int = 0) -> QuantizedMatrix:
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    return quantize(jnp.asarray(w), "int8", group, symmetric=True)


@pytest.fixture(scope="module")
def kernel():
    if not cpu_qmatvec.available():
        pytest.fail("the CPU int8 kernel did not compile here (a C++ compiler is expected on CI machines)")
    return jax.jit(matmul_quant.q8_matvec)


@pytest.mark.parametrize("rows, k, n, group", [(1, 96, 577, 32), (8, 192, 577, 64), (5, 32 * 7, 1, 32)])
def test_kernel_against_numpy_and_the_float_product(kernel, rows, k, n, group):
    qm = int8_matrix(k, n, group, seed=rows)
    packed = matmul_quant.pack_int8_rows(qm)
    assert packed.codes.shape == (n, k) and packed.codes.dtype == jnp.int8 and packed.scales.shape == (n, k // group)
    x = np.random.default_rng(rows + 1).normal(size=(rows, k)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0
    y = np.asarray(kernel(jnp.asarray(x), packed), np.float64)
    same_math = cpu_qmatvec.reference(x, np.asarray(packed.codes), np.asarray(packed.scales))
    np.testing.assert_allclose(y, same_math, rtol=1e-5, atol=1e-5 * np.abs(same_math).max())
    exact = x.astype(np.float64) @ np.asarray(dequantize(qm), np.float64)
    # x's int8 rounding: an error of at most scale / 2 per input, about sqrt(k) * (max|x| / 254) * |w| in a sum
    scale = np.sqrt(k) * np.abs(x).max() / 254 * np.abs(np.asarray(dequantize(qm))).mean()
    np.testing.assert_allclose(y, exact, atol=4 * scale)
    assert np.abs(y - exact).max() > 0 or not x.any()  # the activations really are rounded (not a float path)


def test_packing_round_trip_and_other_paths(kernel):
    qm = int8_matrix(64, 40, 32)
    packed = matmul_quant.pack_int8_rows(qm)
    assert (packed.matmul, packed.cpu_packed) == ("cpu", True)
    back = matmul_quant.unpack_int8_rows(packed)
    np.testing.assert_array_equal(back.codes, qm.codes)
    np.testing.assert_array_equal(back.scales, qm.scales)
    np.testing.assert_array_equal(dequantize(packed), dequantize(qm))  # dequantize reads the packed layout
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64)), jnp.float32)
    np.testing.assert_allclose(quantized_matvec(x, packed), x @ dequantize(qm), rtol=1e-5, atol=1e-5)  # unpacks
    np.testing.assert_allclose(x @ packed, kernel(x, packed), rtol=1e-6)  # __rmatmul__: the kernel
    assert resolve_quantized_matmul("auto", x, packed) == "cpu"
    assert resolve_quantized_matmul("auto", x, qm) == "matvec"  # unpacked: today's XLA form
    np.testing.assert_allclose(x @ qm.with_matmul("cpu"), kernel(x, packed), rtol=1e-6)  # packs on the fly
    for bad, message in ((quantize(jnp.ones((64, 8)), "int4", 32), "format 'int4'"),
                         (quantize(jnp.ones((64, 8)), "int8", 32, symmetric=False), "zero points"),
                         (quantize(jnp.ones((48, 8)), "int8", 16, symmetric=True), "group 16, in 48"),
                         (packed, "already packed")):
        assert not matmul_quant.can_pack(bad)
        with pytest.raises(QuantizationError, match=message):
            matmul_quant.pack_int8_rows(bad)
    with pytest.raises(ValueError, match="x has 63 features"):
        matmul_quant.q8_matvec(x[:, :63], packed)


def test_fallback_without_a_compiler(kernel, monkeypatch, tmp_path):
    qm = int8_matrix(64, 24, 32)
    packed = matmul_quant.pack_int8_rows(qm)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 64)), jnp.float32)
    monkeypatch.setattr(cpu_qmatvec, "COMPILER", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("LLMJAX_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_qmatvec._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU int8 matvec kernel unavailable"):
            assert not cpu_qmatvec.available()
        np.testing.assert_allclose(matmul_quant.q8_matvec(x, packed), quantized_matvec(x, qm), rtol=1e-6)
    finally:
        cpu_qmatvec._load.cache_clear()
    monkeypatch.undo()
    assert cpu_qmatvec.available()


def test_quantized_decode_through_the_kernel(kernel):
    """quantized_decode_params(matmul="auto") packs every int8 matrix the kernel takes (in a multiple of 32) and
    its logits stay close to the XLA reference's (the difference: the activations' int8 rounding)."""
    from llmjax.infer import kv_cache
    from llmjax.infer.decode_model import decode_step, prefill
    from llmjax.model import init_params
    from llmjax.quant.model import quantize_params, quantized_decode_params

    cfg = get_config("llama-tiny", d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=1)
    rng = np.random.default_rng(0)  # NumPy-drawn parameters (compiling init_params' random ops takes 10 s here)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: np.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path) else
        (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), jax.eval_shape(init_params, cfg, jax.random.key(0)))
    qparams = jax.jit(lambda p: quantize_params(p, cfg, "int8", 32, symmetric=True))(params)
    packed = quantized_decode_params(qparams, cfg, "auto", head="int8")
    plain = quantized_decode_params(qparams, cfg, "xla", head="int8")
    leaves = lambda tree: [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedMatrix))  # noqa
                           if isinstance(x, QuantizedMatrix)]
    kinds = sorted({(x.cpu_packed, x.in_features) for x in leaves(packed)})
    assert kinds == [(True, 64), (True, 128)]  # qkv, o, gate_up, the head; down
    assert not any(x.cpu_packed for x in leaves(plain))
    tokens = jnp.asarray([[5, 9, 2, 44, 7, 1]])
    logits = []
    for dparams in (packed, plain):
        cache = kv_cache.init_cache(cfg, 1, 16)
        out, cache = jax.jit(prefill, static_argnames="cfg")(dparams, tokens, jnp.ones_like(tokens, bool), cache, cfg)
        step, _ = jax.jit(decode_step, static_argnames="cfg")(dparams, jnp.asarray([3]), cache, cfg)
        logits.append((np.asarray(out, np.float64), np.asarray(step, np.float64)))
    for ours, reference in zip(*logits):
        np.testing.assert_allclose(ours, reference, atol=0.02 * np.abs(reference).max())
        assert np.abs(ours - reference).max() > 0  # the kernel ran (int8 activations), not the XLA path
