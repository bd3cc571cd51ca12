"""The train step: chunked cross-entropy, gradient accumulation, skipping non-finite updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax.config import TrainConfig, get_config
from llmjax.model import forward
from llmjax.model.params import flatten_with_names
from llmjax.train.step import (
    accumulated_gradients,
    chunked_cross_entropy,
    forward_grad_cross_entropy,
    init_train_state,
    loss_sums,
    make_eval_step,
    make_train_step,
    output_logits,
    train_step,
    windows_to_batch,
)


def windows(cfg, batch, seq, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq + 1)))


@pytest.mark.parametrize("tokens,chunk", [(37, 8), (37, 37), (37, 100), (64, 16)])
def test_chunked_cross_entropy_matches_full_logits(tokens, chunk):
    rng = np.random.default_rng(tokens + chunk)
    vocab, padded = 91, 128
    hidden = jnp.asarray(rng.standard_normal((tokens, 24)), jnp.float32)
    embedding = jnp.asarray(rng.standard_normal((24, padded)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, tokens))

    def full(hidden, embedding):
        logits = (hidden @ embedding)[:, :vocab]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return nll, jax.nn.logsumexp(logits, axis=-1)

    def chunked(hidden, embedding):
        return chunked_cross_entropy(hidden, embedding, targets, vocab, chunk)

    for got, want in zip(chunked(hidden, embedding), full(hidden, embedding)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    objective = lambda fn: lambda h, e: (fn(h, e)[0].sum() + 0.1 * (fn(h, e)[1] ** 2).sum())  # noqa: E731
    got = jax.grad(objective(chunked), argnums=(0, 1))(hidden, embedding)
    want = jax.grad(objective(full), argnums=(0, 1))(hidden, embedding)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,seq,chunk", [(3, 13, 8), (4, 16, 64), (2, 7, 1)])
def test_chunks_cut_positions_and_keep_the_batch_axis(batch, seq, chunk):
    rng = np.random.default_rng(batch * seq)
    hidden = jnp.asarray(rng.standard_normal((batch, seq, 24)), jnp.float32)
    embedding = jnp.asarray(rng.standard_normal((24, 128)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 91, (batch, seq)))
    got = chunked_cross_entropy(hidden, embedding, targets, 91, chunk)
    want = chunked_cross_entropy(hidden.reshape(-1, 24), embedding, targets.reshape(-1), 91, chunk)
    for g, w in zip(got, want):
        assert g.shape == (batch, seq)
        np.testing.assert_allclose(g.reshape(-1), w, rtol=1e-5, atol=1e-5)


def dot_operand_dtypes(jaxpr) -> set:
    """dtypes of every dot_general operand in a jaxpr, sub-jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.update(str(v.aval.dtype) for v in eqn.invars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= dot_operand_dtypes(inner)
    return found


def test_output_logits_backward_multiplies_in_the_compute_dtype():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.bfloat16)
    embedding = jnp.asarray(rng.standard_normal((16, 40)) * 0.1, jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 5, 40)), jnp.float32)
    loss = lambda x, e: jnp.sum(jnp.tanh(output_logits(x, e)) * weights)  # noqa: E731
    grads = jax.grad(loss, argnums=(0, 1))
    assert dot_operand_dtypes(jax.make_jaxpr(grads)(x, embedding).jaxpr) == {"bfloat16"}  # no float32 GEMM
    got_x, got_e = grads(x, embedding)
    assert got_x.dtype == jnp.bfloat16 and got_e.dtype == jnp.float32  # the master weight's gradient stays f32
    reference = lambda x, e: jnp.sum(jnp.tanh(x.astype(jnp.float32) @ e) * weights)  # noqa: E731
    want_x, want_e = jax.grad(reference, argnums=(0, 1))(x, embedding)
    np.testing.assert_allclose(got_x.astype(jnp.float32), want_x, rtol=0.03, atol=0.03)
    np.testing.assert_allclose(got_e, want_e, rtol=0.03, atol=0.03)


def test_fused_pallas_loss_trains_like_the_xla_loss():
    """loss_impl="pallas" (the fused kernel, interpret mode on CPU) gives the XLA loss's values and gradients."""
    cfg = get_config("gpt2-tiny")  # vocab 301 padded to 320: the kernel must ignore the padding
    batch = windows_to_batch(windows(cfg, 2, 24))
    results = {}
    for impl in ("xla", "pallas"):
        train_cfg = TrainConfig(loss_impl=impl)
        state = init_train_state(cfg, train_cfg, jax.random.key(0))
        results[impl] = jax.jit(jax.value_and_grad(lambda p: loss_sums(p, batch, cfg, train_cfg)[0]))(state.params)
    assert float(results["pallas"][0]) == pytest.approx(float(results["xla"][0]), rel=1e-5)
    for got, want in zip(jax.tree.leaves(results["pallas"][1]), jax.tree.leaves(results["xla"][1])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_forward_grad_loss_equals_the_xla_loss(preset):
    """loss_impl="forward_grad" (gradient computed in the forward pass) gives the XLA loss's objective,
    metrics and gradients, with z-loss, a loss mask, padding columns (vocab 301 -> 320) and a last chunk
    that is mostly padding (chunks of 7 x 3 tokens over 3 x 23)."""
    cfg = get_config(preset)
    batch = windows_to_batch(windows(cfg, 3, 23))
    batch["loss_mask"] = jnp.asarray(np.random.default_rng(3).random((3, 23)) < 0.7)
    results = {}
    for impl in ("xla", "forward_grad"):
        train_cfg = TrainConfig(loss_impl=impl, z_loss=1e-2, loss_chunk_tokens=21)
        state = init_train_state(cfg, train_cfg, jax.random.key(0))
        loss = lambda p: loss_sums(p, batch, cfg, train_cfg)  # noqa: E731
        results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)  # eager: op by op, slow
    (got, got_sums), got_grads = results["forward_grad"]
    (want, want_sums), want_grads = results["xla"]
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for key in ("nll_sum", "z_sum", "tokens"):
        assert float(got_sums[key]) == pytest.approx(float(want_sums[key]), rel=1e-5)
    for name, want_leaf in flatten_with_names(want_grads).items():
        np.testing.assert_allclose(flatten_with_names(got_grads)[name], want_leaf, rtol=1e-4, atol=1e-6, err_msg=name)


def test_forward_grad_loss_in_bfloat16_is_close_to_float32():
    """In bf16 the logits are rounded once after the matmul (as under torch autocast): the objective and the
    gradients stay within bf16 tolerance of a float32 computation of the same function."""
    keys = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(keys[0], (2, 37, 64))  # [batch, tokens, d_model]
    embedding = jax.random.normal(keys[1], (64, 112)) * 0.2  # [d_model, padded vocab]
    targets = jax.random.randint(keys[2], (2, 37), 0, 100)
    weights = jnp.ones((2, 37))

    def objective(x, embedding, chunk):
        return forward_grad_cross_entropy(x, embedding, targets, weights, 100, chunk, 1e-3)[0]

    value_and_grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)), static_argnums=2)
    want, want_grads = value_and_grad(x, embedding, 1000)
    got, got_grads = value_and_grad(x.astype(jnp.bfloat16), embedding, 16)
    assert got_grads[0].dtype == jnp.bfloat16 and got_grads[1].dtype == jnp.float32
    assert float(got) == pytest.approx(float(want), rel=5e-3)
    for g, w in zip(got_grads, want_grads):
        assert float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w)) < 2e-2


def test_loss_equals_cross_entropy_of_forward_logits():
    cfg, train_cfg = get_config("llama-tiny"), TrainConfig(loss_chunk_tokens=7)
    state = init_train_state(cfg, train_cfg, jax.random.key(0))
    batch = windows_to_batch(windows(cfg, 3, 20))
    objective, sums = jax.jit(loss_sums, static_argnums=(2, 3))(state.params, batch, cfg, train_cfg)
    logits = jax.jit(forward, static_argnums=2)(state.params, batch["inputs"], cfg)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).sum()
    assert float(sums["nll_sum"]) == pytest.approx(float(want), rel=1e-5)
    assert float(sums["tokens"]) == 60 and float(objective) == pytest.approx(float(want), rel=1e-5)


def test_accumulation_equals_one_large_batch():
    """Gradients and metrics of 4 scanned micro-batches equal those of the whole batch. (Compared as
    gradients: Adam would magnify the rounding noise of gradients that are zero in exact arithmetic.) One model:
    accumulation does not depend on the architecture (each preset costs two compiled steps of CI time)."""
    cfg = get_config("llama-tiny")
    train_cfg = TrainConfig(lr=1e-2, warmup_steps=0, total_steps=10, z_loss=1e-3)
    state = init_train_state(cfg, train_cfg, jax.random.key(1))
    batch = windows_to_batch(windows(cfg, 8, 12))
    batch["loss_mask"] = jnp.asarray(np.random.default_rng(2).random((8, 12)) < 0.8)  # unequal token counts
    gradients = jax.jit(accumulated_gradients, static_argnums=(2, 3))  # jitted: eager scans dispatch op by op
    grads_one, sums_one = gradients(state.params, batch, cfg, train_cfg)
    grads_four, sums_four = gradients(state.params, batch, cfg, train_cfg.replace(micro_batches=4))
    for key in sums_one:
        assert float(sums_four[key]) == pytest.approx(float(sums_one[key]), rel=1e-5), key
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_one))
    for (name, a), b in zip(flatten_with_names(grads_one).items(), jax.tree.leaves(grads_four)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * largest, err_msg=name)
    step = jax.jit(train_step, static_argnames=("model_cfg", "train_cfg"))
    _, metrics_one = step(state, batch, model_cfg=cfg, train_cfg=train_cfg)
    _, metrics_four = step(state, batch, model_cfg=cfg, train_cfg=train_cfg.replace(micro_batches=4))
    for key in ("loss", "z_loss", "grad_norm", "tokens", "learning_rate"):
        assert float(metrics_four[key]) == pytest.approx(float(metrics_one[key]), rel=1e-5), key


def test_batch_not_dividing_into_micro_batches_is_rejected():
    cfg = get_config("gpt2-tiny")
    train_cfg = TrainConfig(micro_batches=3)
    state = init_train_state(cfg, train_cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="batch of 4 sequences does not split into micro_batches=3"):
        train_step(state, windows_to_batch(windows(cfg, 4, 8)), model_cfg=cfg, train_cfg=train_cfg)


def test_training_reduces_loss_and_reports_metrics():
    cfg = get_config("gpt2-tiny")
    train_cfg = TrainConfig(lr=3e-3, warmup_steps=2, total_steps=30)
    step_fn = make_train_step(cfg, train_cfg)
    state = init_train_state(cfg, train_cfg, jax.random.key(0))
    batch = windows_to_batch(windows(cfg, 4, 16))  # one batch, memorized
    losses = []
    for _ in range(30):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30
    assert float(metrics["tokens"]) == 64
    assert 0 < float(metrics["update_ratio"]) < 1 and float(metrics["grad_norm"]) > 0
    evaluated = make_eval_step(cfg, train_cfg)(state.params, batch)
    assert float(evaluated["nll_sum"] / evaluated["tokens"]) == pytest.approx(losses[-1], rel=0.2)


def test_nonfinite_update_is_skipped_when_configured():
    cfg = get_config("gpt2-tiny")
    train_cfg = TrainConfig(skip_nonfinite=True)
    state = init_train_state(cfg, train_cfg, jax.random.key(0))
    state = state._replace(params={**state.params, "final_norm": {**state.params["final_norm"], "scale": state.params["final_norm"]["scale"].at[0].set(jnp.nan)}})
    step = jax.jit(train_step, static_argnames=("model_cfg", "train_cfg"))
    new, metrics = step(state, windows_to_batch(windows(cfg, 2, 8)), model_cfg=cfg, train_cfg=train_cfg)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(new.step) == 1  # moved on to the next batch
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)  # weights untouched (NaN stays NaN)
