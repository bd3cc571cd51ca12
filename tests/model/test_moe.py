"""Mixture-of-Experts: routing math, auxiliary losses by hand, both dispatch paths against a per-token
loop, dropped-token accounting, scanned MoE-every-k blocks, training wiring and bad input."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError, TrainConfig, check_expert_parallel, count_params, get_config
from llmjax.model import forward, hidden_states_and_moe_metrics, init_params, model_spec
from llmjax.model.moe import (
    capacity,
    moe_layer,
    moe_spec,
    route,
    router_collapse,
    router_metrics,
)
from llmjax.model.params import count_from_specs, init_from_specs
from llmjax.model.transformer import block

BASE = get_config("llama-moe-tiny")  # 4 experts top-2, d_model 48, expert width 40


def layer_params(cfg, seed=0):
    params = init_from_specs(moe_spec(cfg), jax.random.key(seed))
    # a router with some spread, so that top-k choices are clear-cut
    params["router"]["kernel"] = params["router"]["kernel"] * 20
    return params


def inputs(cfg, batch=2, seq=12, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, seq, cfg.d_model)), jnp.float32)


def loop_reference(params, x, cfg, slots=None):
    """Per token, in float64: softmax router, top-k, each chosen expert's MLP weighted by the router.

    slots: capacity per expert per sequence; assignments are then taken choice by choice (all first
    choices, then all second ones), earlier tokens first, and those past capacity are dropped.
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    batch, seq, d = x.shape
    k = cfg.experts_per_token
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    y = np.zeros_like(x)
    dropped = 0
    for b in range(batch):
        choices = []
        for s in range(seq):
            logits = x[b, s] @ p["router"]["kernel"]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(-probs)[:k]
            weights = probs[top] / probs[top].sum() if k > 1 else probs[top]
            choices.append((top, weights))
        used = np.zeros(cfg.num_experts, int)
        kept = np.ones((seq, k), bool)
        if slots is not None:
            for j in range(k):
                for s in range(seq):
                    e = choices[s][0][j]
                    kept[s, j] = used[e] < slots
                    used[e] += 1
        for s in range(seq):
            for j, (e, w) in enumerate(zip(*choices[s])):
                if not kept[s, j]:
                    dropped += 1
                    continue
                ex = p["experts"]
                hidden = silu(x[b, s] @ ex["gate"]["kernel"][e]) * (x[b, s] @ ex["up"]["kernel"][e])
                y[b, s] += w * (hidden @ ex["down"]["kernel"][e])
    return y, dropped


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(experts_per_token=5), r"experts_per_token=5: top-k must be between 1 and num_experts=4"),
        (dict(experts_per_token=0), r"experts_per_token=0: top-k must be between 1"),
        (dict(capacity_factor=0.0), r"capacity_factor=0.0: must be > 0"),
        (dict(capacity_factor=-1.0), r"capacity_factor=-1.0: must be > 0"),
        (dict(moe_every=3), r"moe_every=3 must be >= 1 and divide num_layers=2"),
        (dict(moe_impl="megablocks"), r"moe_impl='megablocks': expected one of"),
        (dict(router_jitter=1.5), r"router_jitter=1.5: must be within \[0, 1\)"),
        (dict(num_experts=-2), r"num_experts=-2: must be an integer >= 0"),
    ],
)
def test_bad_moe_config_is_one_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        BASE.replace(**fields)


def test_experts_must_divide_the_expert_parallel_size():
    check_expert_parallel(BASE, 2)
    with pytest.raises(ConfigError, match=r"num_experts=4 does not divide over an expert-parallel size of 8"):
        check_expert_parallel(BASE, 8)


@pytest.mark.parametrize("fields", [dict(), dict(moe_every=2), dict(num_shared_experts=2), dict(mlp_bias=True),
                                    dict(activation="gelu_tanh")])
def test_count_params_total_and_active(fields):
    cfg = BASE.replace(**fields)
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    assert count_params(cfg) == count_from_specs(model_spec(cfg)) - padding
    inactive = cfg.num_moe_layers * (cfg.num_experts - cfg.experts_per_token)
    per_expert = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.expert_width
    per_expert += (cfg.expert_width * (2 if cfg.activation == "swiglu" else 1) + cfg.d_model) if cfg.mlp_bias else 0
    assert count_params(cfg) - count_params(cfg, active=True) == inactive * per_expert


def test_moe_125m_preset_has_the_active_size_of_llama_125m():
    moe, dense = get_config("llama-moe-125m"), get_config("llama-125m")
    assert abs(count_params(moe, active=True) / count_params(dense) - 1) < 0.01
    assert count_params(moe) > 2 * count_params(dense)


# --- routing and auxiliary losses ---------------------------------------------------------

def test_routing_softmax_top_k_and_normalization():
    router = {"kernel": jnp.eye(4, dtype=jnp.float32)}  # logits = the input itself
    x = jnp.array([[np.log(4.0), np.log(3.0), np.log(2.0), 0.0]])  # probs 0.4, 0.3, 0.2, 0.1
    weights, experts, logits, probs = route(router, x, BASE.replace(d_model=4, experts_per_token=2))
    np.testing.assert_allclose(probs, [[0.4, 0.3, 0.2, 0.1]], rtol=1e-6)
    assert experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(weights, [[0.4 / 0.7, 0.3 / 0.7]], rtol=1e-6)  # GShard / Mixtral renormalize
    weights, experts, _, _ = route(router, x, BASE.replace(d_model=4, experts_per_token=1))
    assert experts.tolist() == [[0]]
    np.testing.assert_allclose(weights, [[0.4]], rtol=1e-6)  # Switch keeps the raw probability


def test_router_runs_in_float32_for_bfloat16_inputs():
    cfg = BASE.replace(compute_dtype="bfloat16")
    params = layer_params(cfg)
    weights, _, logits, probs = route(params["router"], inputs(cfg).astype(jnp.bfloat16), cfg)
    assert logits.dtype == probs.dtype == weights.dtype == jnp.float32


def test_load_balance_and_z_loss_by_hand():
    # four tokens, two experts, top-1
    logits = jnp.log(jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]))
    probs = jax.nn.softmax(logits)
    experts = jnp.array([[0], [0], [1], [0]])
    metrics = router_metrics(logits, probs, experts, 2)
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    np.testing.assert_allclose(metrics["load_balance_loss"], 1.15, rtol=1e-6)
    np.testing.assert_allclose(metrics["expert_load"], [0.75, 0.25])
    # the probabilities sum to one, so every logsumexp is 0
    np.testing.assert_allclose(metrics["router_z_loss"], 0.0, atol=1e-12)
    logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    metrics = router_metrics(logits, jax.nn.softmax(logits), jnp.array([[0], [0]]), 2)
    np.testing.assert_allclose(metrics["router_z_loss"], (np.log(2) ** 2 + np.log(4) ** 2) / 2, rtol=1e-6)


def test_load_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    uniform = jnp.zeros((8, 4))
    balanced = router_metrics(uniform, jax.nn.softmax(uniform), jnp.array([[0, 1], [2, 3]] * 4), 4)
    np.testing.assert_allclose(balanced["load_balance_loss"], 1.0, rtol=1e-6)
    collapsed_logits = jnp.tile(jnp.array([[30.0, 0.0, 0.0, 0.0]]), (8, 1))
    collapsed = router_metrics(collapsed_logits, jax.nn.softmax(collapsed_logits), jnp.zeros((8, 1), int), 4)
    np.testing.assert_allclose(collapsed["load_balance_loss"], 4.0, rtol=1e-5)


def test_router_collapse_is_reported():
    cfg = BASE  # 4 experts, top-2: balanced load 0.5, collapse above 0.875
    assert router_collapse([[0.5, 0.5, 0.5, 0.5], [0.85, 0.4, 0.35, 0.4]], cfg) is None
    layer, expert, message = router_collapse([[0.5, 0.5, 0.5, 0.5], [0.2, 0.95, 0.45, 0.4]], cfg)
    assert (layer, expert) == (1, 1)
    assert "router collapse: MoE layer 1 sends 95% of its tokens to expert 1" in message


def test_jitter_and_noise_only_with_a_key():
    cfg = BASE.replace(router_jitter=0.2, router_noise=1.0)
    params, x = layer_params(cfg), inputs(cfg)
    plain = moe_layer(params, x, cfg)[0]
    np.testing.assert_array_equal(plain, moe_layer(params, x, BASE)[0])
    noisy = moe_layer(params, x, cfg, jax.random.key(3))[0]
    assert float(jnp.abs(noisy - plain).max()) > 1e-4


# --- dispatch paths against the per-token loop --------------------------------------------

@pytest.mark.parametrize("impl", ["capacity", "ragged_dot", "pallas"])
@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_equals_the_per_token_loop(impl, k):
    cfg = BASE.replace(moe_impl=impl, experts_per_token=k, capacity_factor=4.0 / k)  # capacity: nothing dropped
    params, x = layer_params(cfg), inputs(cfg)
    y, metrics = moe_layer(params, x, cfg)
    want, dropped = loop_reference(params, x, cfg)
    assert dropped == 0 and float(metrics["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_capacity_drops_past_capacity_in_priority_order():
    cfg = BASE.replace(moe_impl="capacity", capacity_factor=0.5)
    params, x = layer_params(cfg), inputs(cfg, batch=3, seq=16)
    slots = capacity(16, cfg)
    assert slots == 4
    y, metrics = moe_layer(params, x, cfg)
    want, dropped = loop_reference(params, x, cfg, slots=slots)
    assert dropped > 0
    np.testing.assert_allclose(float(metrics["dropped_fraction"]), dropped / (3 * 16 * 2), rtol=1e-6)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_dispatch_paths_have_equal_gradients():
    cfg = BASE.replace(capacity_factor=2.0)
    params, x = layer_params(cfg), inputs(cfg)
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)

    def loss(params, x, impl):
        y, metrics = moe_layer(params, x, cfg.replace(moe_impl=impl))
        return jnp.sum(y * cotangent) + metrics["load_balance_loss"] + metrics["router_z_loss"]

    gradient = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads = {impl: gradient(params, x, impl) for impl in ("capacity", "ragged_dot", "pallas")}
    for impl in ("capacity", "pallas"):
        for got, want in zip(jax.tree.leaves(grads[impl]), jax.tree.leaves(grads["ragged_dot"])):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_shared_experts_and_biases_and_gelu():
    cfg = BASE.replace(num_shared_experts=1, mlp_bias=True, activation="gelu_tanh", capacity_factor=2.0)
    params, x = layer_params(cfg), inputs(cfg)
    params = jax.tree.map(lambda a: a + 0.01, params)  # nonzero biases
    ys = [moe_layer(params, x, cfg.replace(moe_impl=impl))[0] for impl in ("capacity", "ragged_dot", "pallas")]
    for y in ys[1:]:
        np.testing.assert_allclose(y, ys[0], rtol=1e-4, atol=1e-5)


# --- blocks, scan, training ----------------------------------------------------------------

def test_moe_every_k_scans_groups_in_layer_order():
    """A 4-layer model with MoE in layers 1 and 3, against the blocks applied one by one."""
    cfg = BASE.replace(num_layers=4, moe_every=2)
    params = init_params(cfg, jax.random.key(2))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    got, metrics = jax.jit(hidden_states_and_moe_metrics, static_argnums=2)(params, tokens, cfg)
    assert metrics["load_balance_loss"].shape == (2,) and metrics["expert_load"].shape == (2, cfg.num_experts)
    from llmjax.model.layers import norm

    @jax.jit
    def one_by_one(params, tokens):
        x = params["embed"]["token"][tokens]
        positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
        for group in range(2):
            x, _, _ = block(jax.tree.map(lambda a: a[group, 0], params["blocks"]), x, positions, cfg)
            x, _, _ = block(jax.tree.map(lambda a: a[group], params["moe_blocks"]), x, positions, cfg)
        return norm(params["final_norm"], x, cfg)

    np.testing.assert_allclose(got, one_by_one(params, tokens), rtol=1e-5, atol=1e-5)


def test_remat_and_jit_do_not_change_the_moe_forward():
    cfg = BASE.replace(num_layers=4, moe_every=2)
    params = init_params(cfg, jax.random.key(2))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    want = forward(params, tokens, cfg)
    got = jax.jit(forward, static_argnums=2)(params, jnp.asarray(tokens), cfg.replace(remat="full"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_aux_losses_enter_the_objective_and_the_metrics():
    from llmjax.train.step import init_train_state, loss_sums, make_train_step, windows_to_batch

    cfg = BASE.replace(num_layers=1, moe_aux_loss_weight=0.5, moe_router_z_loss_weight=0.25)
    train_cfg = TrainConfig(total_steps=20, warmup_steps=1, lr=1e-2)
    windows = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)))
    batch = windows_to_batch(windows)
    state = jax.jit(init_train_state, static_argnums=(0, 1))(cfg, train_cfg, jax.random.key(0))
    objective, sums = jax.jit(loss_sums, static_argnums=(2, 3))(state.params, batch, cfg, train_cfg)
    _, metrics = jax.jit(hidden_states_and_moe_metrics, static_argnums=2)(state.params, batch["inputs"], cfg)
    aux = 0.5 * metrics["load_balance_loss"].mean() + 0.25 * metrics["router_z_loss"].mean()
    np.testing.assert_allclose(objective, sums["nll_sum"] + aux * sums["tokens"], rtol=1e-5)

    step = make_train_step(cfg, train_cfg)
    losses = []
    for _ in range(6):
        state, logged = step(state, batch)
        losses.append(float(logged["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert logged["moe/expert_load"].shape == (cfg.num_moe_layers, cfg.num_experts)
    np.testing.assert_allclose(np.asarray(logged["moe/expert_load"]).sum(-1), cfg.experts_per_token, rtol=1e-5)
    assert 1.0 <= float(logged["moe/load_balance_loss"]) < cfg.num_experts
    assert float(logged["moe/dropped_fraction"]) == 0.0


def test_micro_batches_accumulate_moe_metrics_like_one_batch():
    from llmjax.train.step import accumulated_gradients, windows_to_batch

    cfg = BASE.replace(num_layers=1)
    windows = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 9)))
    batch = windows_to_batch(windows)
    params = init_params(cfg, jax.random.key(0))
    accumulate = jax.jit(accumulated_gradients, static_argnums=(2, 3))
    whole = accumulate(params, batch, cfg, TrainConfig(micro_batches=1))[1]
    split = accumulate(params, batch, cfg, TrainConfig(micro_batches=2))[1]
    assert whole.keys() == split.keys() and "moe_expert_load_sum" in whole
    np.testing.assert_allclose(split["moe_expert_load_sum"].sum(-1), whole["moe_expert_load_sum"].sum(-1), rtol=1e-5)


def test_collapse_is_warned_in_the_training_log(caplog):
    from llmjax.train.loop import _warn_router_collapse

    values = {"moe/expert_load": [[0.95, 0.55, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]]}
    with caplog.at_level(logging.WARNING, logger="llmjax.train.loop"):
        warned = set()
        _warn_router_collapse(values, BASE, 40, warned)
        _warn_router_collapse({"moe/expert_load": [[0.25, 0.95, 0.55, 0.25], [0.5] * 4]}, BASE, 50, warned)  # once per layer
    assert len([r for r in caplog.records if "router collapse" in r.message]) == 1


def test_kv_cache_decoding_of_an_moe_model_equals_the_full_forward():
    """MoE blocks in the decode path (llmjax.infer.decode_model), every 2nd block, dropless routing."""
    from tests.infer.test_kv_cache import full_forward, run_cache

    cfg = BASE.replace(num_layers=4, moe_every=2)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, cfg.vocab_size, n + 5).tolist() for n in (7, 3, 9)]
    got, _ = run_cache(cfg, params, sequences, "left", None)
    want = full_forward(cfg, params, sequences)
    np.testing.assert_allclose(got[..., : cfg.vocab_size], want[..., : cfg.vocab_size], atol=2e-5, rtol=1e-4)


def test_expert_load_goes_to_metrics_and_tensorboard_histograms(tmp_path):
    from llmjax.train.loop import MetricsLog, read_metrics

    log = MetricsLog(tmp_path)
    log.write(10, "train", {"loss": 3.0, "moe/expert_load": [[0.5, 0.25, 0.75, 0.5], [1.0, 0.5, 0.25, 0.25]]})
    log.close()
    assert read_metrics(tmp_path)[0]["moe/expert_load"][1] == [1.0, 0.5, 0.25, 0.25]
    events = b"".join(e.read_bytes() for e in (tmp_path / "tensorboard").iterdir())
    assert b"train/moe/expert_load/layer_0" in events and b"train/moe/expert_load/layer_1" in events


def test_flops_count_the_active_experts():
    from llmjax.train.metrics import matmul_params

    moe, dense = get_config("llama-moe-125m"), get_config("llama-125m")
    router = moe.num_moe_layers * moe.d_model * moe.num_experts
    assert matmul_params(moe) == matmul_params(dense) + router  # top-2 of width 1024 = one MLP of width 2048
    switch = get_config("switch-moe-125m")
    assert matmul_params(switch) == matmul_params(dense) + switch.num_moe_layers * switch.d_model * switch.num_experts
