"""The jax-triton RMSNorm (tools/triton_rms_norm.py) against the model's rms_norm (GPU only: Triton kernels
need CUDA)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.nn import rms_norm


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((4096, 4096), jnp.bfloat16), ((37, 1000), jnp.float32), ((2, 3, 768), jnp.float16)])
def test_triton_call_rms_norm_matches_reference(shape, dtype, load_tool):
    pytest.importorskip("triton")
    tool = load_tool("triton_rms_norm")

    try:
        tool.import_jax_triton()  # with the triton-3.6 shim: a plain import first would lock in jax-triton's stubs
    except ImportError:
        pytest.skip("jax-triton is not installed (the gpu extra)")

    keys = jax.random.split(jax.random.key(0))
    x = jax.random.normal(keys[0], shape, dtype)
    scale = (1 + 0.1 * jax.random.normal(keys[1], shape[-1:], jnp.float32)).astype(dtype)
    want = rms_norm(x.astype(jnp.float32), scale.astype(jnp.float32), 1e-6)
    got = tool.rms_norm_triton(x, scale, 1e-6).astype(jnp.float32)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tolerance, rtol=tolerance)


def test_wrong_scale_shape_is_one_clear_error(load_tool):
    with pytest.raises(ValueError, match=r"scale has shape \(5,\), expected \(8,\)"):
        load_tool("triton_rms_norm").rms_norm_triton(jnp.ones((2, 8)), jnp.ones(5))
