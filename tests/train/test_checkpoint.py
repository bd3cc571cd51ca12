"""orbax checkpoints: exact round trip, keep-last-plus-best, fallback past corrupt ones, config checks."""

import logging
import shutil

import jax
import numpy as np
import pytest

from llmjax.config import TrainConfig, get_config
from llmjax.train.checkpoint import CheckpointError, Checkpointer, abstract_train_state, run_record
from llmjax.train.step import init_train_state, train_step, windows_to_batch

CFG, TRAIN = get_config("gpt2-tiny"), TrainConfig(warmup_steps=0, total_steps=10)


def trained_state(steps: int):
    state = init_train_state(CFG, TRAIN, jax.random.key(0))
    windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9))
    for _ in range(steps):
        state, _ = train_step(state, windows_to_batch(windows), model_cfg=CFG, train_cfg=TRAIN)
    return state


def record(step):
    return run_record(CFG, TRAIN, loader_state={"step": step, "seed": 7}, seed=7)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
    state = trained_state(3)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(state, record=record(3))
    checkpointer.wait()
    restored, saved_record = Checkpointer(tmp_path).restore_latest(abstract_train_state(state), CFG)
    assert_trees_equal(restored, state)
    assert int(restored.step) == 3 and saved_record["loader_state"] == {"step": 3, "seed": 7}


def test_no_checkpoint_gives_none(tmp_path):
    assert Checkpointer(tmp_path).restore_latest(abstract_train_state(trained_state(0)), CFG) is None


def save_steps(checkpointer, losses):
    state = trained_state(0)
    for step, val_loss in losses.items():
        checkpointer.save(state._replace(step=state.step + step), record=record(step), val_loss=val_loss)
    checkpointer.wait()


def test_keeps_the_last_k_and_the_best(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=2, keep_best=1)
    save_steps(checkpointer, {10: 3.0, 20: 1.5, 30: 2.5, 40: None, 50: 2.0})
    assert checkpointer.steps() == [20, 40, 50]  # 20 is the best; 40 and 50 the latest


def test_corrupt_latest_falls_back_to_the_previous(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, keep_last=3)
    save_steps(checkpointer, {1: None, 2: None})
    for file in (tmp_path / "2" / "state").rglob("*"):
        if file.is_file():
            file.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        restored, saved_record = Checkpointer(tmp_path).restore_latest(abstract_train_state(trained_state(0)), CFG)
    assert int(restored.step) == 1 and saved_record["loader_state"]["step"] == 1
    assert "checkpoint at step 2" in caplog.text and "falling back to step 1" in caplog.text


def test_interrupted_save_leaves_previous_usable(tmp_path):
    """A save killed midway leaves only orbax's temporary folder, which is never taken for a checkpoint."""
    checkpointer = Checkpointer(tmp_path)
    save_steps(checkpointer, {1: None})
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "1", partial)
    shutil.rmtree(partial / "state")
    restored, _ = Checkpointer(tmp_path).restore_latest(abstract_train_state(trained_state(0)), CFG)
    assert int(restored.step) == 1


def test_resume_with_other_execution_settings(tmp_path):
    """remat, unrolling and kernel choices change how a step computes, not the state: resuming is allowed."""
    checkpointer = Checkpointer(tmp_path)
    save_steps(checkpointer, {1: None})
    other = CFG.replace(remat="full", scan_unroll=2, attention_impl="xla", norm_impl="xla")
    restored, _ = Checkpointer(tmp_path).restore_latest(abstract_train_state(trained_state(0)), other)
    assert int(restored.step) == 1


def test_different_model_config_is_refused_with_the_fields(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    save_steps(checkpointer, {1: None})
    other = CFG.replace(d_model=64, num_layers=3)
    with pytest.raises(CheckpointError, match=r"different model config \(d_model: 48 in the checkpoint, 64 now; num_layers: 2 in the checkpoint, 3 now\)"):
        Checkpointer(tmp_path).restore_latest(abstract_train_state(trained_state(0)), other)
