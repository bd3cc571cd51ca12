"""orbax checkpoints: the run-folder Checkpointer (exact round trip, keep-last-plus-best, fallback past
corrupt ones, config checks) and save / restore of any pytree at a path."""

import functools
import logging
import shutil

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llmjax.config import TrainConfig, get_config
from llmjax.train.checkpoint import (
    CheckpointError,
    Checkpointer,
    abstract_train_state,
    checkpoint_step,
    restore,
    run_record,
    save,
)
from llmjax.train.step import init_train_state, train_step, windows_to_batch

CFG, TRAIN = get_config("gpt2-tiny"), TrainConfig(warmup_steps=0, total_steps=10)


def trained_state(steps: int):
    state = init_train_state(CFG, TRAIN, jax.random.key(0))
    windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9))
    step = jax.jit(functools.partial(train_step, model_cfg=CFG, train_cfg=TRAIN))
    for _ in range(steps):
        state, _ = step(state, windows_to_batch(windows))
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


# --- save / restore of any pytree at a path ----------------------------------------------------------

class Pair(NamedTuple):
    first: jax.Array
    second: dict


def own_tree(seed=0):
    """Every kind of leaf and container a learner's tree may hold, at awkward sizes."""
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((3, 7)), jnp.float32),
        "half": jnp.asarray(rng.standard_normal((5,)), jnp.bfloat16),
        "layers": [jnp.asarray(rng.integers(-9, 9, (2, 3)), jnp.int32), (jnp.float32(rng.standard_normal()),
                                                                        np.arange(11, dtype=np.int64))],
        "pair": Pair(jnp.asarray(rng.standard_normal(13), jnp.float32), {"count": jnp.int32(4)}),
        "numpy": rng.standard_normal((4, 1)).astype(ml_dtypes.bfloat16),
        "learning_rate": 3e-4,
        "epochs": 7,
    }


def assert_same_leaves(got, want):
    """Same leaf types (jax / NumPy / Python), dtypes and values, leaf for leaf."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves, strict=True):
        assert isinstance(a, jax.Array) == isinstance(b, jax.Array), (type(a), type(b))
        assert isinstance(a, np.ndarray) == isinstance(b, np.ndarray), (type(a), type(b))
        if isinstance(b, (int, float)):
            assert type(a) is type(b) and a == b
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_any_tree_round_trips_as_saved_without_like(tmp_path):
    tree = own_tree()
    assert save(tmp_path / "ckpt", tree, step=12) == tmp_path / "ckpt"
    restored = restore(tmp_path / "ckpt")
    assert_same_leaves(restored, tree)
    assert isinstance(restored["layers"], list) and isinstance(restored["layers"][1], tuple)
    assert restored["pair"]._fields == ("first", "second")  # a namedtuple with the fields; the class needs `like`
    assert restored["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert checkpoint_step(tmp_path / "ckpt") == 12


def test_like_gives_back_the_classes_exactly(tmp_path):
    tree = own_tree(1)
    save(tmp_path / "ckpt", tree)
    restored = restore(tmp_path / "ckpt", like=tree)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert type(restored["pair"]) is Pair
    assert_same_leaves(restored, tree)
    assert checkpoint_step(tmp_path / "ckpt") is None


def test_optax_adamw_state_and_params_resume_exactly(tmp_path):
    """Save (params, adamw state) after two updates; two more updates from the restored copy equal two
    more from the original, bit for bit."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), "b": jnp.zeros(5, jnp.bfloat16)}
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    update = jax.jit(optimizer.update)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params) for _ in range(4)]

    def apply(params, opt_state, grads):
        updates, opt_state = update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = (params, optimizer.init(params))
    for g in grads[:2]:
        state = apply(*state, g)
    save(tmp_path / "adamw", state, step=2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = restore(tmp_path / "adamw", like=abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for g in grads[2:]:
        state, restored = apply(*state, g), apply(*restored, g)
    assert_same_leaves(restored, state)
    assert checkpoint_step(tmp_path / "adamw") == 2


def test_like_sets_dtype_and_sharding(tmp_path):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py simulates 8 CPU devices)")
    tree = {"w": jnp.arange(24.0, dtype=jnp.float32).reshape(8, 3), "b": jnp.arange(5, dtype=jnp.int32)}
    save(tmp_path / "ckpt", tree)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    like = {"w": jax.ShapeDtypeStruct((8, 3), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data"))),
            "b": np.zeros(5, np.int32)}
    restored = restore(tmp_path / "ckpt", like=like)
    assert restored["w"].dtype == jnp.bfloat16 and restored["w"].sharding == like["w"].sharding
    np.testing.assert_array_equal(np.asarray(restored["w"], np.float32), np.arange(24.0).reshape(8, 3))
    assert isinstance(restored["b"], np.ndarray) and not isinstance(restored["b"], jax.Array)
    np.testing.assert_array_equal(restored["b"], np.arange(5))


def test_saving_again_replaces_the_checkpoint_and_leaves_nothing_beside_it(tmp_path):
    save(tmp_path / "ckpt", {"a": jnp.ones(3)}, step=1)
    save(tmp_path / "ckpt", {"b": jnp.zeros((2, 2), jnp.int32)}, step=2)
    assert_same_leaves(restore(tmp_path / "ckpt"), {"b": jnp.zeros((2, 2), jnp.int32)})
    assert checkpoint_step(tmp_path / "ckpt") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "empty").mkdir()
    save(tmp_path / "empty", {"a": jnp.ones(2)})  # an empty folder holds nothing to lose
    assert_same_leaves(restore(tmp_path / "empty"), {"a": jnp.ones(2)})


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path / "ckpt", {"a": jnp.ones(3)}, step=1)
    with pytest.raises(TypeError, match="the leaf at 'x/0' is a object; a checkpoint holds jax or NumPy arrays"):
        save(tmp_path / "ckpt", {"a": jnp.ones(3), "x": [object()]}, step=2)

    async def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    # the record's write fails inside orbax, after it has begun the temporary folder
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path / "ckpt", {"a": jnp.zeros(3)}, step=3)
    monkeypatch.undo()
    assert_same_leaves(restore(tmp_path / "ckpt"), {"a": jnp.ones(3)})
    assert checkpoint_step(tmp_path / "ckpt") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written copy left beside it


def test_refuses_to_overwrite_what_is_not_a_checkpoint(tmp_path):
    notes = tmp_path / "results"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=f"{notes} exists and is not a checkpoint"):
        save(notes, {"a": jnp.ones(2)})
    assert (notes / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("keep me too")
    with pytest.raises(FileExistsError, match="is not a checkpoint"):
        save(tmp_path / "file", {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="step must be an int >= 0 or None, not -1"):
        save(tmp_path / "new", {"a": jnp.ones(2)}, step=-1)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {missing}: the path does not exist"):
        restore(missing)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*plain: the folder has no _CHECKPOINT_METADATA"):
        restore(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {missing}"):
        checkpoint_step(missing)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: {**t, "w": jnp.zeros((4, 7))}, r"at 'w' the checkpoint holds shape \(3, 7\), `like` has shape \(4, 7\)"),
        (lambda t: {**t, "pair": Pair(t["pair"].first, {"count": jnp.int32(0), "extra": jnp.ones(2)})},
         r"`like` has 'pair/second/extra' \(shape \(2,\)\), which the checkpoint lacks"),
        (lambda t: {k: v for k, v in t.items() if k != "numpy"}, r"the checkpoint holds 'numpy' \(shape \(4, 1\)\), which `like` lacks"),
        (lambda t: {**t, "layers": [t["layers"][0]]}, r"the checkpoint holds 'layers/1/0' \(shape \(\)\), which `like` lacks"),
    ],
)
def test_like_of_another_structure_or_shape_names_the_first_difference(tmp_path, change, message):
    tree = own_tree(2)
    save(tmp_path / "ckpt", tree)
    with pytest.raises(CheckpointError, match=message):
        restore(tmp_path / "ckpt", like=change(tree))


def test_a_training_checkpoint_folder_is_readable_by_restore(tmp_path):
    state = trained_state(0)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(state._replace(step=state.step + 5), record=record(5))
    checkpointer.wait()
    restored = restore(tmp_path / "5", like=abstract_train_state(state))
    assert type(restored) is type(state) and int(restored.step) == 5
    assert_trees_equal(restored.params, state.params)
    assert checkpoint_step(tmp_path / "5") == 5
