"""The fused RMSNorm / LayerNorm Pallas kernels against the model's own norms (llmjax.model.layers):
values and gradients of x, scale and bias, on the CPU in interpret mode (awkward sizes, both the
whole-row and the chunked path) and on a GPU at real sizes; bad input gets a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

EPS = 1e-5
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative error ||got - want|| / ||want||


def relative_error(got, want) -> float:
    got, want = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (got, want))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_inputs(shape, dtype, param_dtype, seed):
    """x with a non-zero mean and uneven scale per row; scale, bias, dy random (never zeros)."""
    rng = np.random.default_rng(seed)
    d = shape[-1]
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[:-1] + (1,)) + rng.normal(size=shape[:-1] + (1,))
    scale, bias = rng.normal(1.0, 0.5, size=d), rng.normal(size=d)
    dy = rng.normal(size=shape)
    return (jnp.asarray(x, dtype), jnp.asarray(scale, param_dtype), jnp.asarray(bias, param_dtype),
            jnp.asarray(dy, dtype))


def norm_pair(kind, **kernel_options):
    """(kernel, reference), both as f(x, scale, bias)."""
    if kind == "rms":
        return (lambda x, s, b: rms_norm(x, s, EPS, **kernel_options),
                lambda x, s, b: rms_norm_reference(x, s, EPS))
    return (lambda x, s, b: layer_norm(x, s, b, EPS, **kernel_options),
            lambda x, s, b: layer_norm_reference(x, s, b, EPS))


def check_against_reference(kind, shape, dtype, param_dtype=None, seed=0, tolerance=None, **kernel_options):
    param_dtype = param_dtype or dtype
    tolerance = tolerance or TOLERANCE[dtype]
    x, scale, bias, dy = random_inputs(shape, dtype, param_dtype, seed)
    kernel, reference = norm_pair(kind, **kernel_options)
    y, kernel_vjp = jax.vjp(kernel, x, scale, bias)
    y_want, reference_vjp = jax.vjp(reference, x, scale, bias)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert relative_error(y, y_want) < tolerance
    grads, grads_want = kernel_vjp(dy), reference_vjp(dy)
    for name, got, want in zip(("dx", "dscale", "dbias"), grads, grads_want):
        assert got.dtype == want.dtype, name
        if kind == "rms" and name == "dbias":
            assert not np.any(np.asarray(got)), "rms_norm has no bias"
            continue
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
        assert relative_error(got, want) < tolerance, (name, relative_error(got, want))


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "shape,options",
    [
        ((37, 48), {}),  # whole rows, padded 48 -> 64 columns, a partial last tile
        # leading axes; several tiles per backward program
        ((3, 5, 200), {"forward": {"block_rows": 4}, "backward": {"block_rows": 4, "programs": 3}}),
        # the chunked path for wide rows: 4 chunks, the last partial
        ((37, 200), {"forward": {"block_d": 64, "block_rows": 8}, "backward": {"block_d": 64, "block_rows": 2}}),
    ],
)
def test_matches_reference_values_and_gradients(kind, dtype, shape, options):
    check_against_reference(kind, shape, dtype, seed=shape[-1], interpret=True, **options)


def test_bfloat16_input_with_float32_parameters():
    """The model's mixed precision: x in the compute dtype, parameters float32."""
    check_against_reference("layer", (19, 96), jnp.bfloat16, param_dtype=jnp.float32, interpret=True)


def test_inside_jit_and_grad():
    x, scale, bias, _ = random_inputs((16, 64), jnp.float32, jnp.float32, seed=1)
    loss = lambda f: lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b)))  # noqa: E731
    kernel, reference = norm_pair("layer", interpret=True)
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: rms_norm(jnp.ones((4, 8)), jnp.ones(7), EPS), r"scale must have shape \(8,\) to match x's last axis"),
        (lambda: layer_norm(jnp.ones((4, 8)), jnp.ones(8), jnp.ones((1, 8)), EPS), r"bias must have shape \(8,\)"),
        (lambda: rms_norm(jnp.ones((4, 8), jnp.int32), jnp.ones(8), EPS), "float32, bfloat16 or float16; x is int32"),
        (lambda: rms_norm(jnp.ones((4, 8)), jnp.ones(8, jnp.int8), EPS), "scale is int8"),
        (lambda: rms_norm(jnp.ones((4, 0)), jnp.ones(0), EPS), "non-empty last axis"),
        (lambda: rms_norm(jnp.ones((4, 8)), jnp.ones(8), -1.0), "eps must be a non-negative"),
        (lambda: rms_norm(jnp.ones((4, 8)), jnp.ones(8), EPS, forward={"block_rows": 3}),
         "block_rows must be a power of two"),
        (lambda: rms_norm(jnp.ones((4, 8)), jnp.ones(8), EPS, backward={"one_pass": True}),
         "backward tuning takes .*; got one_pass"),
    ],
)
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# --- on a GPU, at real sizes --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("shape", [(16384, 4096), (4, 1024, 768), (2048, 5120), (256, 32768)])
def test_gpu_matches_reference(kind, shape):
    """bfloat16 at training sizes, including a non-power-of-two width and one past the whole-row limit."""
    check_against_reference(kind, shape, jnp.bfloat16, param_dtype=jnp.float32, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_gpu_float32(kind):
    check_against_reference(kind, (4096, 1000), jnp.float32, seed=4, tolerance=1e-4)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("shape,options", [((37, 48), {}), ((21, 200), {"block_d": 64, "block_rows": 8})])
def test_layer_norm_one_and_two_pass_statistics(one_pass, shape, options):
    """Both LayerNorm forward statistics (one sweep of shifted sums, or mean then centred squares), whole rows
    and chunked, on rows whose mean is 300x their spread (where unshifted E[x^2] - mean^2 loses float32 digits)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=shape) * 0.1 + rng.uniform(-30, 30, size=shape[:-1] + (1,))
    x, scale, bias = jnp.asarray(x, jnp.float32), jnp.asarray(rng.normal(1, 0.5, shape[-1]), jnp.float32), \
        jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
    got = layer_norm(x, scale, bias, EPS, interpret=True, forward={"one_pass": one_pass, **options})
    assert relative_error(got, layer_norm_reference(x, scale, bias, EPS)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16384, 4096), (256, 32768)])
def test_gpu_layer_norm_one_pass(shape):
    """The one-pass LayerNorm forward at real sizes, whole rows and chunked (gradients as the two-pass one)."""
    check_against_reference("layer", shape, jnp.bfloat16, param_dtype=jnp.float32, seed=5, forward={"one_pass": True})
