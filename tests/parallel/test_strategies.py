"""Every sharding strategy trains exactly like one device, with each array where the rules say
(8 simulated CPU devices)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.flash_attention.reference import attention_reference
from llmjax.config import TrainConfig, get_config
from llmjax.model.params import flatten_with_names
from llmjax.parallel.mesh import make_mesh
from llmjax.parallel.plan import BatchError, Plan
from llmjax.parallel.ring_attention import sharded_ring_attention
from llmjax.train.step import init_train_state, make_train_step, windows_to_batch

MODEL = get_config("llama-tiny", max_seq_len=32)  # d_model 48, 6 heads / 2 kv heads, d_ff 112, vocab 301 -> 320
TRAIN = TrainConfig(lr=3e-3, warmup_steps=0, total_steps=3, loss_chunk_tokens=40, loss_impl="xla")
STEPS, BATCH, SEQ = 3, 8, 32


def batches():
    rng = np.random.default_rng(0)
    return [windows_to_batch(jnp.asarray(rng.integers(0, MODEL.vocab_size, (BATCH, SEQ + 1)))) for _ in range(STEPS)]


@functools.cache
def single_device_run():
    state = init_train_state(MODEL, TRAIN, jax.random.key(0))
    step = make_train_step(MODEL, TRAIN)
    history = []
    for batch in batches():
        state, metrics = step(state, batch)
        history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return history, jax.device_get(state.params)


CASES = [
    ("dp", "data=8"),
    ("zero1", "data=8"),
    ("zero2", "data=2,fsdp=4"),
    ("fsdp", "fsdp=8"),
    ("tp", "data=4,tensor=2"),
    ("fsdp+tp", "fsdp=4,tensor=2"),
    ("sp", "data=2,sequence=4"),
    ("auto", "fsdp=2,sequence=2,tensor=2"),
]


# the losses that run per batch shard: the Pallas kernel (interpret mode), the forward-gradient chunks
FUSED_LOSS_CASES = [("dp", "data=8"), ("fsdp", "data=2,fsdp=4")]


@pytest.mark.parametrize("strategy,mesh,loss_impl", [(*case, "xla") for case in CASES]
                         + [(*case, impl) for case in FUSED_LOSS_CASES for impl in ("pallas", "forward_grad")])
def test_strategy_trains_like_one_device(strategy, mesh, loss_impl):
    plan = Plan.create(mesh, strategy)
    train_cfg = dataclasses.replace(TRAIN, loss_impl=loss_impl)
    state = plan.init_state(MODEL, train_cfg, jax.random.key(0))
    step = make_train_step(MODEL, train_cfg, plan)
    history = []
    for batch in batches():
        state, metrics = step(state, jax.device_put(batch, plan.batch_sharding()))
        history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    want_history, want_params = single_device_run()
    np.testing.assert_allclose(history, want_history, rtol=2e-5)  # loss and gradient norm at every step
    got = flatten_with_names(jax.device_get(state.params))
    for name, want in flatten_with_names(want_params).items():  # Adam turns reduction-order noise into ~lr/100
        np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=TRAIN.lr / 100, err_msg=name)
    # the layout survives the step: every leaf where the plan puts it
    expected = plan.state_shardings(MODEL, TRAIN)
    for got_leaf, want_sharding in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        assert got_leaf.sharding.is_equivalent_to(want_sharding, got_leaf.ndim)


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_fp8_trains_like_one_device(scaling):
    """FP8 projections under FSDP + tensor parallelism (weights and activations both cut): each operand's scale
    comes from its global amax (XLA all-reduces the max of a sharded tensor; delayed scaling's histories are
    replicated and hold the global amaxes), so the sharded run rounds as one device does; what differs is the
    summation order. One strategy (CI time): the scales do not depend on it."""
    model = dataclasses.replace(MODEL, matmul_precision="fp8", fp8_scaling=scaling, fp8_history=4)

    def run(plan):
        state = (plan.init_state(model, TRAIN, jax.random.key(0)) if plan
                 else init_train_state(model, TRAIN, jax.random.key(0)))
        step = make_train_step(model, TRAIN, plan)
        history = []
        for batch in batches():
            state, metrics = step(state, jax.device_put(batch, plan.batch_sharding()) if plan else batch)
            history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        return history, state

    want, want_state = run(None)
    assert want != single_device_run()[0]  # FP8 rounding shows: not the float run
    got, got_state = run(Plan.create("fsdp=4,tensor=2", "fsdp+tp"))
    np.testing.assert_allclose(got, want, rtol=2e-3)
    if scaling == "delayed":  # the histories: the global amaxes of the last steps, the same on every device
        got_params, want_params = flatten_with_names(jax.device_get(got_state.params)), flatten_with_names(
            jax.device_get(want_state.params))
        names = [name for name in want_params if name.endswith("fp8_history")]
        assert names and all((want_params[name][..., :len(want)] > 0).all() for name in names)
        for name in names:  # the output gradients' amaxes after Adam steps carry the summation order's noise
            np.testing.assert_allclose(got_params[name], want_params[name], rtol=2e-2, err_msg=name)


def leaf_specs(tree):
    return {name: tuple(leaf.sharding.spec) for name, leaf in flatten_with_names(tree).items()}


def moment_specs(opt_state):
    """Specs of Adam's first moments, by parameter name."""
    (mu,) = [node.mu for node in jax.tree.leaves(opt_state, is_leaf=lambda n: hasattr(n, "mu")) if hasattr(node, "mu")]
    return leaf_specs(mu)


def test_zero1_replicates_params_and_cuts_optimizer_state():
    state = Plan.create("data=8", "zero1").init_state(MODEL, TRAIN, jax.random.key(0))
    assert all(all(entry is None for entry in spec) for spec in leaf_specs(state.params).values())
    mu = moment_specs(state.opt_state)
    assert mu["blocks/attn/q/kernel"] == (None, "data", None, None)  # [layers, embed, heads, head_dim]
    assert mu["blocks/mlp/down/kernel"] == (None, None, "data")  # [layers, mlp, embed]
    assert mu["embed/token"] == (None, "data")


def test_fsdp_cuts_params_and_optimizer_state_alike():
    state = Plan.create("fsdp=4,tensor=2", "fsdp+tp").init_state(MODEL, TRAIN, jax.random.key(0))
    params, mu = leaf_specs(state.params), moment_specs(state.opt_state)
    assert params["blocks/attn/q/kernel"] == (None, "fsdp", "tensor", None)
    assert params["blocks/mlp/up/kernel"] == (None, "fsdp", "tensor")
    assert params["lm_head/kernel"] == ("fsdp", "tensor")
    assert mu == params


def test_initial_state_equals_the_unsharded_one():
    state = Plan.create("fsdp=4,tensor=2", "fsdp+tp").init_state(MODEL, TRAIN, jax.random.key(3))
    want = init_train_state(MODEL, TRAIN, jax.random.key(3))
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_batch_must_divide_over_data_parallel_devices():
    with pytest.raises(BatchError, match=r"--batch 6 does not divide over the 4 data-parallel devices .* multiple of 4"):
        Plan.create("data=2,fsdp=2,tensor=2", "fsdp+tp").check_batch(6)
    Plan.create("data=2,fsdp=2,tensor=2", "fsdp+tp").check_batch(8)


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match=r"unknown sharding strategy 'zero3'; choose one of dp, zero1"):
        Plan.create("data=8", "zero3")


ATTENTION_CASES = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, sliding_window=7),
    dict(causal=True, segments=True),
    dict(causal=True, logit_softcap=5.0),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(k for k, v in c.items() if v))
def test_ring_attention_is_exact_with_gradients(case):
    mesh, rules = make_mesh("data=2,sequence=4"), {"batch": "data", "length": "sequence"}
    rng = np.random.default_rng(7)
    b, s, heads, kv_heads, d = 2, 36, 6, 2, 8  # chunks of 9 tokens, GQA groups of 3
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in [(b, s, heads, d), (b, s, kv_heads, d), (b, s, kv_heads, d)])
    kwargs = {key: value for key, value in case.items() if key != "segments"}
    if case.get("segments"):
        kwargs["q_segment_ids"] = jnp.asarray(np.cumsum(rng.random((b, s)) < 0.15, axis=1))
    ring = jax.jit(lambda q, k, v: sharded_ring_attention(q, k, v, mesh=mesh, rules=rules, **kwargs))
    full = lambda q, k, v: attention_reference(q, k, v, **kwargs)  # noqa: E731
    np.testing.assert_allclose(ring(q, k, v), full(q, k, v), atol=2e-6)
    weights = jnp.asarray(rng.standard_normal((b, s, heads, d)), jnp.float32)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weights)  # noqa: E731
    got = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(full), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_ring_attention_rejects_a_sequence_that_does_not_divide():
    mesh = make_mesh("data=2,sequence=4")
    x = jnp.zeros((2, 30, 2, 8))
    with pytest.raises(ValueError, match=r"sequence length 30 does not divide over mesh axis 'sequence' of size 4"):
        sharded_ring_attention(x, x, x, mesh=mesh, rules={"length": "sequence"})
