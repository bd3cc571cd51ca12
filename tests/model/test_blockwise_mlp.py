"""The blockwise MLP (ModelConfig.mlp_block_tokens) against the whole-sequence MLP: the same logits and gradients,
FP8 histories and sharded layouts; less compiled memory; and the max_context experiment's search on a CPU."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llmjax.config import TrainConfig, get_config
from llmjax.model import init_params
from llmjax.model.layers import mlp, mlp_spec
from llmjax.model.params import init_from_specs
from llmjax.model.transformer import forward
from llmjax.train.step import init_train_state, make_train_step, train_step

SEQ = 24  # blocks of 8 divide it; blocks of 5 do not (5 blocks, the last padded by one token)


@functools.cache
def logits_and_grads(preset: str, block_tokens: int, remat: str):
    """(logits [2, SEQ, vocab], gradients of sum(logits * weights) w.r.t. every parameter), float32 compute."""
    cfg = get_config(preset, mlp_block_tokens=block_tokens, remat=remat, compute_dtype="float32")
    params = init_params(cfg.replace(mlp_block_tokens=0, remat="none"), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, cfg.vocab_size)
    weights = jax.random.normal(jax.random.key(2), (2, SEQ, cfg.padded_vocab_size))

    def objective(params):
        logits = forward(params, tokens, cfg)[..., : cfg.vocab_size]
        return jnp.sum(logits * weights[..., : cfg.vocab_size]), logits

    grads, logits = jax.jit(jax.grad(objective, has_aux=True))(params)
    return np.asarray(logits), jax.device_get(grads)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])  # GELU with biases, SwiGLU without
@pytest.mark.parametrize("block_tokens,remat", [(8, "none"), (5, "none"), (5, "full")])
def test_blockwise_mlp_matches_the_whole_sequence(preset, block_tokens, remat):
    want_logits, want_grads = logits_and_grads(preset, 0, remat)
    got_logits, got_grads = logits_and_grads(preset, block_tokens, remat)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_a_sequence_within_one_block_takes_the_plain_path():
    cfg = get_config("llama-tiny", mlp_block_tokens=SEQ)
    params = init_from_specs(mlp_spec(cfg), jax.random.key(0))
    x = jnp.ones((1, SEQ, cfg.d_model))
    assert "scan" not in str(jax.make_jaxpr(lambda x: mlp(params, x, cfg))(x))
    assert "scan" in str(jax.make_jaxpr(lambda x: mlp(params, x, cfg.replace(mlp_block_tokens=SEQ - 1)))(x))


def test_fp8_delayed_histories_combine_by_max():
    """Delayed scaling quantizes every block with the same histories' scales, and the blocks' new histories combine
    by max (not sum): one training step ends with the whole-sequence step's parameters and histories."""
    windows = jax.random.randint(jax.random.key(1), (2, 31), 0, 301)  # 30 tokens: blocks of 7, the last padded
    batch = {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
    train_cfg = TrainConfig(warmup_steps=0, loss_impl="xla")
    ends = []
    for block_tokens in (0, 7):
        cfg = get_config("llama-tiny", matmul_precision="fp8", fp8_scaling="delayed", mlp_block_tokens=block_tokens)
        state, _ = make_train_step(cfg, train_cfg)(init_train_state(cfg, train_cfg, jax.random.key(0)), batch)
        ends.append(jax.device_get(state.params))
    history = ends[1]["blocks"]["mlp"]["down"]["fp8_history"]  # [layers, 3, H]
    assert np.all(history[:, :, 0] > 0) and np.all(history[:, :, 1:] == 0)  # this step's amaxes, once each
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(ends[1]), jax.tree.leaves(ends[0])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("seq", [32, 30])
def test_blocks_keep_a_sequence_sharded_layout(seq):
    """Sequence parallelism (the token axis cut 4 ways): strided blocks hold every device's share of tokens, so
    the blockwise MLP runs without a collective when the blocks divide the sequence; same values either way."""
    from llmjax.parallel.plan import Plan

    cfg = get_config("llama-tiny", mlp_block_tokens=8)
    params = init_from_specs(mlp_spec(cfg), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, seq, cfg.d_model))
    plan = Plan.create("data=2,sequence=4", "sp")

    @jax.jit
    def sharded(params, x):
        with plan.activations():
            return mlp(params, x, cfg)

    x_sharded = jax.device_put(x, NamedSharding(plan.mesh, PartitionSpec("data", "sequence" if seq % 4 == 0 else None)))
    got = sharded(params, x_sharded)
    np.testing.assert_allclose(got, mlp(params, x, cfg.replace(mlp_block_tokens=0)), rtol=1e-5, atol=1e-6)
    if seq % 8 == 0:
        hlo = sharded.lower(params, x_sharded).compile().as_text()
        assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"))
        assert got.sharding.spec == PartitionSpec("data", "sequence")


def temp_bytes(block_tokens: int, remat: str, seq: int = 1024) -> int:
    """Temporaries of a compiled training step (llama-tiny widened to d_ff 4096, one layer, batch 1)."""
    cfg = get_config("llama-tiny", num_layers=1, d_ff=4096, max_seq_len=seq, mlp_block_tokens=block_tokens,
                     remat=remat, attention_impl="xla")
    train_cfg = TrainConfig(loss_impl="xla")
    state = jax.eval_shape(lambda: init_train_state(cfg, train_cfg, jax.random.key(0)))
    batch = {k: jax.ShapeDtypeStruct((1, seq), jnp.int32) for k in ("inputs", "targets")}
    step = functools.partial(train_step, model_cfg=cfg, train_cfg=train_cfg)
    return jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat", ["none", "full"])
def test_blocks_lower_the_compiled_memory_of_a_training_step(remat):
    """XLA CPU shows it too (reliably: about half the temporaries here): at 1,024 tokens the [tokens, d_ff] hidden
    (16 MiB per tensor) and the up / gate outputs no longer exist whole, neither kept for the backward pass nor
    recomputed there."""
    whole, blocks = temp_bytes(0, remat), temp_bytes(128, remat)
    assert blocks < 0.8 * whole, (blocks, whole)


# --- experiments/max_context ------------------------------------------------------------------------------------

def test_longest_fitting_doubles_then_bisects():
    from llmjax.experiments.max_context import longest_fitting

    tried = []

    def fits_below(limit):
        def fits(length):
            tried.append(length)
            return length <= limit
        return fits

    assert longest_fitting(fits_below(5000), 1024, 1 << 20, 256) == 4864
    assert tried[:4] == [1024, 2048, 4096, 8192] and all(t % 256 == 0 for t in tried)
    assert longest_fitting(fits_below(10**9), 1000, 5000, 1000) == 5000  # the maximum fits
    assert longest_fitting(fits_below(2500), 4096, 1 << 20, 1024) == 2048  # the start does not fit: below it
    assert longest_fitting(fits_below(100), 1024, 4096, 1024) == 0  # nothing fits


def test_longest_below_halves_then_bisects_after_an_optimistic_estimate():
    """A real step failed at 212,992 tokens although the estimate said it fits: the search goes down by halving
    (106,496 runs) and bisects between, not back up from the bottom."""
    from llmjax.experiments.max_context import longest_below

    tried = []

    def fits(length):
        tried.append(length)
        return length <= 140_000

    assert longest_below(fits, 212_992, 8192) == 139_264
    assert tried[0] == 106_496 and len(tried) <= 5 and all(t % 8192 == 0 for t in tried)
    tried.clear()
    assert longest_below(lambda n: tried.append(n) or n <= 20_000, 212_992, 8192) == 16_384
    assert tried[:4] == [106_496, 49_152, 24_576, 8192]  # halving until one fits, then bisection
    assert longest_below(lambda n: False, 65_536, 8192) == 0
    assert longest_below(lambda n: True, 8192, 8192) == 0  # nothing below the granularity


def test_offload_configuration_keeps_the_layer_boundary_residuals_on_the_host(capsys):
    """blockwise+offload's policy (remat "names", remat_offload=("block_input",)): the scan's stacked residual, one
    [batch, seq, d_model] per layer, is saved in host memory and no per-layer copy of it stays on the device."""
    from jax.ad_checkpoint import print_saved_residuals

    from llmjax.experiments.max_context import configuration, parse_args
    from llmjax.model.transformer import hidden_states

    args = parse_args(["--model", "llama-tiny", "--block-tokens", "16", "--budget-gib", "1"])
    base = get_config("llama-tiny", num_layers=2)
    cfg, _ = configuration("blockwise+offload", base, 32, args, "cpu")
    assert cfg.remat == "names" and cfg.remat_offload == ("block_input",)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((1, 32), jnp.int32)
    print_saved_residuals(lambda p: hidden_states(p, tokens, cfg).astype(jnp.float32).sum(), params)
    residuals = capsys.readouterr().out.splitlines()
    stacked = f"[2,1,32,{cfg.d_model}]"
    assert any("<host>" in line and stacked in line for line in residuals), residuals
    assert not any("<host>" not in line and stacked in line for line in residuals), residuals


def test_max_context_smoke(tmp_path, capsys):
    """A tiny model on a CPU budget between the two configurations' peaks at 64 tokens (about 1.35 MB plain, 1.26 MB
    blockwise): the table, the JSON (every length tried, per configuration) and the PNG. Two compiles."""
    from llmjax.experiments import max_context

    argv = ["--model", "llama-tiny", "--set", "num_layers=1", "--configs", "vanilla,plain,blockwise", "--start", "64",
            "--max", "64", "--granularity", "64", "--block-tokens", "32", "--budget-gib", "0.0013",
            "--out", str(tmp_path)]
    assert max_context.main(argv) == 0
    result = json.loads((tmp_path / "llama-tiny.json").read_text())
    rows = {r["config"]: r for r in result["results"]}
    assert set(rows) == {"vanilla", "plain", "blockwise"}
    assert rows["vanilla"]["fields"] == {"remat": "none", "remat_offload": [], "mlp_block_tokens": 0,
                                         "attention_impl": "xla", "loss_chunk_tokens": TrainConfig().loss_chunk_tokens}
    assert rows["blockwise"]["fields"] == {"remat": "full", "remat_offload": [], "mlp_block_tokens": 32,
                                           "attention_impl": "xla", "loss_chunk_tokens": 32}
    for row in rows.values():
        assert [t["tokens"] for t in row["tried"]] == [64] and row["confirmed"] is None and not row["errors"]
        assert row["tried"][0]["peak_estimate"] > 0 and row["longest_tokens"] in (0, 64)
    assert rows["blockwise"]["longest_tokens"] >= rows["plain"]["longest_tokens"]
    assert (tmp_path / "llama-tiny.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| blockwise |" in out and "| x vanilla | x plain |" in out


def test_max_context_looks_finer_when_nothing_fits_at_the_granularity(monkeypatch):
    """Vanilla attention fits 5,000 tokens where the search steps by 8,192: it looks again at 1,024 below the first
    length tried (finds 4,096 and stops there), and the ratios in the table are to that length; 700 tokens need
    one more eighth: 512 at 256."""
    from llmjax.experiments import max_context

    limits = {"vanilla": 5000, "plain": 40_000}
    monkeypatch.setattr(max_context, "analyze", lambda name, tokens, *rest: {
        "tokens": tokens, "fits": tokens <= limits[name], "peak_estimate": tokens})
    args = max_context.parse_args(["--model", "llama-tiny", "--start", "16384", "--max", "65536",
                                   "--granularity", "8192", "--budget-gib", "1"])
    base = get_config("llama-tiny")
    results = [max_context.search(name, base, args, [], "cpu", 1.0, False) for name in ("vanilla", "plain")]
    assert [(r["longest_tokens"], r["granularity"]) for r in results] == [(4096, 1024), (32_768, 8192)]
    assert "| plain | 32,768 | 8.0x | 1.0x |" in max_context.table(results)
    limits["vanilla"] = 700
    assert max_context.search("vanilla", base, args, [], "cpu", 1.0, False)["longest_tokens"] == 512


def test_max_context_one_real_step_on_the_cpu(tmp_path):
    """The confirming process's work (one real step of a configuration), run here in-process."""
    from llmjax.experiments import max_context

    args = max_context.parse_args(["--model", "llama-tiny", "--set", "num_layers=1", "--block-tokens", "16",
                                   "--budget-gib", "1"])
    result = max_context.run_one_step("blockwise", 48, args)
    assert result["ok"] and np.isfinite(result["loss"]), result


def test_max_context_flags_fail_clearly(capsys):
    from llmjax.experiments import max_context

    for argv, message in ((["--configs", "plain,fast"], "--configs: unknown configuration 'fast'"),
                          (["--start", "8192", "--max", "4096"], "--start=8192 exceeds --max=4096"),
                          (["--block-tokens", "0"], "--block-tokens=0: must be a positive integer")):
        with pytest.raises(SystemExit):
            max_context.parse_args(argv)
        assert message in capsys.readouterr().err
