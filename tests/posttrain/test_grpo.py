"""GRPO end to end on the CPU: a tiny random policy, rollouts from the serving engine, a reward for low token ids
(about half of a random policy's tokens, so every group has something to compare); a few seeded iterations raise
the mean reward well above where it started (measured: 0.51 -> 1.0 in eight iterations)."""

import jax
import numpy as np

from llmjax.config import TrainConfig, get_config
from llmjax.infer.engine import Engine, EngineConfig, SamplingParams
from llmjax.model import init_params
from llmjax.posttrain.grpo import GRPOConfig, grpo_iteration, grpo_loss, row_length
from llmjax.posttrain.rollouts import Rollout, completion_rows
from llmjax.train.state import train_state_from_params

ENGINE = EngineConfig(num_blocks=128, block_size=4, max_running=32, max_tokens_per_step=64, max_prefill_rows=4)


def test_grpo_raises_the_reward_of_a_tiny_policy():
    cfg = get_config("llama-tiny", vocab_size=64)
    params = init_params(cfg, jax.random.key(0))
    train_cfg = TrainConfig(lr=3e-2, warmup_steps=0, total_steps=100, schedule="constant", weight_decay=0.0)
    state = train_state_from_params(params, cfg, train_cfg)
    engine = Engine(params, cfg, ENGINE)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 5, 4, 6)]
    low = cfg.vocab_size // 2

    def reward_of(rollout):
        return float(np.mean([t < low for t in rollout.completion_ids]))

    config = GRPOConfig(group_size=8, updates_per_batch=2)
    sampling = SamplingParams(max_tokens=6, temperature=1.0)
    history = []
    for iteration in range(8):
        state, metrics = grpo_iteration(state, engine, prompts, reward_of, cfg=cfg, train_cfg=train_cfg,
                                        config=config, sampling=sampling, seq_len=16, seed=iteration)
        history.append(metrics)
    rewards = [m["reward_mean"] for m in history]
    assert 0.2 < rewards[0] < 0.8, rewards  # a random policy: about half its tokens are low
    assert np.mean(rewards[-2:]) > rewards[0] + 0.25, rewards
    assert all(m["completion_length"] == 6 for m in history)
    assert int(state.step) == 8 * config.updates_per_batch


def test_rows_cut_to_the_batch_give_the_same_objective_and_gradient():
    """grpo_iteration trains on rows as long as the batch's longest rollout (rounded up to 32), not seq_len: the
    causal model and the completion mask make the cut rows' objective and gradient those of the full-length rows."""
    import jax.numpy as jnp

    cfg = get_config("llama-tiny", vocab_size=64, max_seq_len=128)
    params = init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(2)
    rollouts = [Rollout(i // 3, tuple(rng.integers(0, 64, 5 + i).tolist()), tuple(rng.integers(0, 64, 9 + 2 * i)
                                                                                  .tolist()), "length")
                for i in range(6)]  # the longest: 10 + 19 tokens
    assert row_length(rollouts, 100) == 32 and row_length(rollouts, 20) == 20 and row_length(rollouts[:1], 100) == 32
    advantages = jnp.asarray(rng.normal(size=6), jnp.float32)
    config = GRPOConfig(group_size=3)

    def objective(seq_len):
        rows = {key: jnp.asarray(value) for key, value in completion_rows(rollouts, seq_len).items()}
        batch = {**rows, "advantages": advantages,
                 "old_logps": jnp.zeros_like(rows["completion_mask"]) - 3.0}  # ratios away from 1: clipping engages
        return jax.value_and_grad(grpo_loss, has_aux=True)(params, batch, cfg, config)

    (cut_loss, cut_metrics), cut_grads = objective(row_length(rollouts, 100))
    (full_loss, full_metrics), full_grads = objective(100)
    np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-5)
    assert cut_metrics["clip_fraction"] == full_metrics["clip_fraction"] > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), cut_grads, full_grads)


def test_grpo_kl_penalty_to_a_frozen_reference():
    """kl_coef > 0: the reference's log-probs enter the objective (kl 0 while the policy is the reference, positive
    once it has moved), rollout throughput is reported, and a missing reference is one clear error."""
    import pytest

    cfg = get_config("llama-tiny", vocab_size=64)
    params = init_params(cfg, jax.random.key(1))
    reference = jax.tree.map(np.array, params)  # the trainer's params are donated: the reference is a copy
    train_cfg = TrainConfig(lr=3e-2, warmup_steps=0, total_steps=100, schedule="constant", weight_decay=0.0)
    state = train_state_from_params(params, cfg, train_cfg)
    engine = Engine(params, cfg, ENGINE)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]

    def reward_of(rollout):
        return float(np.mean([t < 32 for t in rollout.completion_ids]))

    sampling = SamplingParams(max_tokens=6, temperature=1.0)
    kwargs = {"cfg": cfg, "train_cfg": train_cfg, "sampling": sampling, "seq_len": 16}
    one_update = GRPOConfig(group_size=4, updates_per_batch=1, kl_coef=0.5)
    state, first = grpo_iteration(state, engine, prompts, reward_of, config=one_update, seed=0, ref_params=reference,
                                  **kwargs)
    assert first["kl"] == 0.0  # the only update saw the policy equal to its reference
    assert first["rollout_tokens_per_s"] > 0 and first["rollout_seconds"] > 0
    state, second = grpo_iteration(state, engine, prompts, reward_of, config=one_update, seed=1, ref_params=reference,
                                   **kwargs)
    assert second["kl"] > 0
    with pytest.raises(ValueError, match="needs ref_params"):
        grpo_iteration(state, engine, prompts, reward_of, config=one_update, seed=2, **kwargs)
    with pytest.raises(ValueError, match="kl_coef"):
        GRPOConfig(kl_coef=-1.0)


def test_grpo_experiment_runs_evaluates_and_resumes(byte_run, tmp_path, capsys):
    """`experiments grpo` on a tiny base: rollouts, rewards, held-out evaluations, curves, a checkpoint, and a second
    command that resumes at the next iteration. (A random policy writes no 'Answer:' line: the reward is 0 and so
    is every advantage; the run still goes through every part.)"""
    import json

    from llmjax.experiments import grpo

    from llmjax.train.loop import read_metrics

    run_dir = tmp_path / "run"
    flags = ["--ckpt", str(byte_run), "--prompts", "2", "--group-size", "2", "--updates", "1", "--max-tokens", "4",
             "--eval-every", "1", "--eval-problems", "3", "--num-blocks", "512", "--max-running", "8",
             "--run-dir", str(run_dir), "--lr", "1e-3", "--no-progress"]
    assert grpo.main([*flags, "--iterations", "2"]) == 0
    assert grpo.main([*flags, "--iterations", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert summary["start_iteration"] == 2 and summary["end_iteration"] == 3
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["kind"] == "validation"] == [0, 1, 2, 3]
    assert all(r["completion_length"] <= 4 and "reward_mean" in r for r in records if r["kind"] == "train")
    assert (run_dir / "grpo.png").is_file()
    assert grpo.main([*flags, "--iterations", "3", "--group-size", "1"]) == 2
    assert "--group-size 1: GRPO compares" in capsys.readouterr().err
    assert grpo.main([*flags, "--iterations", "3", "--kl-coef", "-0.1"]) == 2
    assert "--kl-coef -0.1: must be a number >= 0" in capsys.readouterr().err
    assert grpo.main([*flags, "--eval-only"]) == 0  # the held-out accuracy of the base, as JSON
    evaluation = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert evaluation["problems"] == 3 and evaluation["accuracy"] == 0.0 and evaluation["tokens_per_s"] > 0
    assert grpo.main([*flags, "--eval-only", "--compute-dtype", "bfloat16"]) == 0  # mixed precision from the CLI
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["problems"] == 3
    budget_run = [*flags[:-4], str(tmp_path / "budget"), *flags[-3:]]
    assert grpo.main([*budget_run, "--iterations", "5", "--time-budget", "0"]) == 0  # stops after one iteration
    summary = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert summary["end_iteration"] == 1 and summary["seconds"] > 0
