"""The fused linear cross-entropy Pallas kernels against full-logits cross-entropy (optax) and the
training loss's chunked XLA version: (nll, log_z) and the gradients of hidden and embedding under
random cotangents for both outputs, on the CPU in interpret mode (awkward sizes, a padded
vocabulary) and on a GPU at GPT-2 size; bad input gets a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.cross_entropy import cross_entropy_reference, cross_entropy_with_grad, linear_cross_entropy
from llmjax.train.step import chunked_cross_entropy

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative error ||got - want|| / ||want||


def relative_error(got, want) -> float:
    got, want = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (got, want))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_problem(tokens, d, padded_vocab, vocab_size, dtype, seed):
    """hidden, embedding (padding columns random too: they must not count), targets that include
    the first and the last real token id, cotangents for nll and log_z."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(tokens, d)), dtype)
    embedding = jnp.asarray(rng.normal(size=(d, padded_vocab)) * 2 / np.sqrt(d), dtype)
    targets = rng.integers(0, vocab_size, tokens)
    targets[:2] = 0, vocab_size - 1
    g_nll, g_log_z = rng.normal(size=(2, tokens))
    return hidden, embedding, jnp.asarray(targets, jnp.int32), (jnp.asarray(g_nll, jnp.float32),
                                                                jnp.asarray(g_log_z, jnp.float32))


def check_against_reference(tokens, d, padded_vocab, vocab_size, dtype, seed=0, tolerance=None, value_tolerance=1e-5,
                            **options):
    tolerance = tolerance or TOLERANCE[dtype]
    hidden, embedding, targets, cotangents = random_problem(tokens, d, padded_vocab, vocab_size, dtype, seed)
    fused = lambda h, w: linear_cross_entropy(h, w, targets, vocab_size, **options)  # noqa: E731
    reference = lambda h, w: cross_entropy_reference(h, w, targets, vocab_size)  # noqa: E731
    (nll, log_z), fused_vjp = jax.vjp(fused, hidden, embedding)
    (nll_want, log_z_want), reference_vjp = jax.vjp(reference, hidden, embedding)
    assert nll.shape == log_z.shape == (tokens,) and nll.dtype == log_z.dtype == jnp.float32
    assert relative_error(nll, nll_want) < value_tolerance and relative_error(log_z, log_z_want) < value_tolerance
    grads = fused_vjp(cotangents)
    for name, got, want in zip(("dhidden", "dembedding"), grads, reference_vjp(cotangents)):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert relative_error(got, want) < tolerance, (name, relative_error(got, want))
    assert not np.any(np.asarray(grads[1][:, vocab_size:], np.float32)), "padding columns get no gradient"
    return hidden, embedding, targets, (nll, log_z)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "options",
    [
        {"block_tokens": 16, "block_vocab": 64, "block_d": 16},  # one vocab split, one backward chunk
        {"block_tokens": 16, "block_vocab": 32, "block_d": 32, "vocab_splits": 3, "chunk_tokens": 32},  # both split
    ],
)
def test_matches_full_logits_reference(dtype, options):
    check_against_reference(53, 40, 320, 301, dtype, seed=len(options), interpret=True, **options)


def test_matches_the_training_loss_chunked_cross_entropy():
    hidden, embedding, targets, (nll, log_z) = check_against_reference(
        45, 48, 160, 160, jnp.float32, seed=7, interpret=True, block_tokens=16, block_vocab=32, block_d=16
    )
    nll_want, log_z_want = chunked_cross_entropy(hidden, embedding, targets, 160, chunk_tokens=16)
    assert relative_error(nll, nll_want) < 1e-5 and relative_error(log_z, log_z_want) < 1e-5


def test_inside_jit_with_a_z_loss():
    hidden, embedding, targets, _ = random_problem(32, 32, 64, 50, jnp.float32, seed=3)

    def loss(ce):
        def objective(h, w):
            nll, log_z = ce(h, w, targets, 50)
            return nll.mean() + 1e-2 * jnp.square(log_z).mean()
        return objective

    fused = lambda h, w, t, v: linear_cross_entropy(h, w, t, v, block_tokens=16, block_vocab=16, block_d=16,  # noqa: E731
                                                    interpret=True)
    got = jax.jit(jax.grad(loss(fused), argnums=(0, 1)))(hidden, embedding)
    want = jax.grad(loss(cross_entropy_reference), argnums=(0, 1))(hidden, embedding)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5


def ones(*shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: linear_cross_entropy(ones(2, 4, 8), ones(8, 32), ones(8, dtype=jnp.int32), 32),
         r"hidden must be \[tokens, d_model\]"),
        (lambda: linear_cross_entropy(ones(8, 8), ones(16, 32), ones(8, dtype=jnp.int32), 32),
         "hidden's d_model 8 does not match embedding's 16"),
        (lambda: linear_cross_entropy(ones(8, 8), ones(8, 32), ones(7, dtype=jnp.int32), 32),
         r"targets must have shape \(8,\)"),
        (lambda: linear_cross_entropy(ones(8, 8), ones(8, 32), ones(8), 32), "targets must be integer token ids"),
        (lambda: linear_cross_entropy(ones(8, 8), ones(8, 32, dtype=jnp.bfloat16), ones(8, dtype=jnp.int32), 32),
         "must have one dtype"),
        (lambda: linear_cross_entropy(ones(8, 8, dtype=jnp.int32), ones(8, 32, dtype=jnp.int32),
                                      ones(8, dtype=jnp.int32), 32), "hidden is int32"),
        (lambda: linear_cross_entropy(ones(8, 8), ones(8, 32), ones(8, dtype=jnp.int32), 33),
         r"vocab_size must be an int in \[1, padded_vocab=32\]"),
        (lambda: linear_cross_entropy(ones(8, 8), ones(8, 32), ones(8, dtype=jnp.int32), 32, block_vocab=48),
         "block_vocab must be a power of two >= 16"),
    ],
)
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def with_grad_reference(logits, targets, weights, vocab_size, z_loss):
    """(d objective / d logits, nll, log_z) by autodiff of the float32 objective."""
    def objective(logits):
        logits = jnp.where(jnp.arange(logits.shape[1]) < vocab_size, logits, -jnp.inf)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        nll = log_z - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return (weights * (nll + z_loss * jnp.square(log_z))).sum(), (nll, log_z)

    (_, (nll, log_z)), grad = jax.value_and_grad(objective, has_aux=True)(logits.astype(jnp.float32))
    return grad, nll, log_z


def check_with_grad(rows, padded_vocab, vocab_size, dtype, z_loss, seed, **options):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(rows, padded_vocab)) * 4, dtype)
    targets = rng.integers(0, vocab_size, rows)
    targets[:2] = 0, vocab_size - 1
    weights = jnp.asarray((rng.random(rows) < 0.8) * rng.random(rows), jnp.float32)  # some rows do not count
    got = cross_entropy_with_grad(logits, jnp.asarray(targets), weights, vocab_size, z_loss, **options)
    want = with_grad_reference(logits, jnp.asarray(targets), weights, vocab_size, z_loss)
    assert got[0].dtype == dtype and got[0].shape == logits.shape
    assert relative_error(got[0], want[0]) < TOLERANCE[dtype]
    for got_values, want_values in zip(got[1:], want[1:]):
        assert relative_error(got_values, want_values) < 1e-6
    assert not np.any(np.asarray(got[0][:, vocab_size:], np.float32)), "padding columns get no gradient"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,padded_vocab,vocab_size,options", [
    (13, 300, 290, {"block_rows": 4, "block_vocab": 64}),  # rows and columns past the last whole block
    (8, 256, 256, {"block_rows": 2, "block_vocab": 128}),  # everything whole, no padding columns
    (5, 200, 37, {"block_rows": 1, "block_vocab": 32}),  # most columns are padding
])
def test_cross_entropy_with_grad_matches_autodiff(dtype, rows, padded_vocab, vocab_size, options):
    check_with_grad(rows, padded_vocab, vocab_size, dtype, 1e-2, seed=rows, interpret=True, **options)


def test_cross_entropy_with_grad_bad_input():
    logits = jnp.ones((4, 32))
    with pytest.raises(ValueError, match=r"targets \(3,\) and weights \(4,\) must be \[rows\]"):
        cross_entropy_with_grad(logits, jnp.zeros(3, jnp.int32), jnp.ones(4), 32, interpret=True)
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        cross_entropy_with_grad(logits, jnp.zeros(4, jnp.int32), jnp.ones(4), 40, interpret=True)
    with pytest.raises(ValueError, match="block_vocab must be a power of two"):
        cross_entropy_with_grad(logits, jnp.zeros(4, jnp.int32), jnp.ones(4), 32, block_vocab=48, interpret=True)


# --- on a GPU, at real sizes --------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_gpt2_size_bfloat16():
    """batch 16 x 1024 tokens, GPT-2's d_model and padded vocabulary."""
    check_against_reference(16384, 768, 50304, 50257, jnp.bfloat16, seed=11)


@pytest.mark.gpu
def test_gpu_float32_awkward_sizes():
    """float32 (the kernels' dots run in tf32, as XLA's do by default): uneven tokens, d, vocab."""
    check_against_reference(3001, 200, 5000, 4999, jnp.float32, seed=12, tolerance=1e-2, value_tolerance=1e-3,
                            chunk_tokens=1024)


@pytest.mark.gpu
def test_gpu_cross_entropy_with_grad_gpt2_chunk():
    """One 8192-token chunk of GPT-2's bf16 logits (the forward_grad training loss's shape)."""
    check_with_grad(8192, 50304, 50257, jnp.bfloat16, 0.0, seed=13)
    check_with_grad(1000, 128256, 128256, jnp.bfloat16, 1e-4, seed=14)
