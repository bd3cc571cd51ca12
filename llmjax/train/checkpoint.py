"""Checkpoints on orbax: any pytree at a path you name, and training runs with keep-last/best.

Every checkpoint folder holds two orbax items: `state` (the arrays) and `record` (JSON), and
orbax writes it into a temporary folder renamed when complete, so a crash mid-save leaves what
was there before intact.

`save(path, tree, step)` / `restore(path, like)` work on any pytree (nested dicts, lists, tuples,
NamedTuples such as optax states; float, bfloat16 and int arrays; scalars) at one path.

`Checkpointer` is the training default: one run directory, `run/checkpoints/<step>/`,
asynchronous, keeping the last K plus the best by validation loss. Its record holds what is needed
to continue exactly: the model and train configs, the data loader's position and the seed.
Restoring walks back from the newest step past any that cannot be read, saying so; a checkpoint
of a different model is an error, not skipped. Each step folder is also readable by `restore`.
"""

from __future__ import annotations

import logging
import operator
import shutil
import time
import uuid
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import metadata as ocp_metadata
from orbax.checkpoint._src.metadata.pytree_metadata_options import PyTreeMetadataOptions  # not exported by 0.12.4
from orbax.checkpoint.checkpoint_managers import preservation_policy

from llmjax.config import ModelConfig, config_differences, config_to_dict

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used for this run."""


STATE, RECORD = "state", "record"  # the two items of every checkpoint folder
METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax writes it into every finalized checkpoint folder


def handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """orbax handlers of the two items. The tree keeps its container types (tuples stay tuples,
    NamedTuples come back as namedtuples with the same fields), so it can be restored without a template."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    tree_handler = ocp.StandardCheckpointHandler(
        pytree_metadata_options=PyTreeMetadataOptions(support_rich_types=True))
    registry.add(STATE, ocp.args.StandardSave, tree_handler)
    registry.add(STATE, ocp.args.StandardRestore, tree_handler)
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(RECORD, ocp.args.JsonSave, json_handler)
    registry.add(RECORD, ocp.args.JsonRestore, json_handler)
    return registry


def _folder_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=handler_registry()))


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a complete checkpoint folder of this layout (a temporary one is not)."""
    path = Path(path)
    return (path / METADATA_FILE).is_file() and (path / STATE).is_dir()


def save(path: str | Path, tree, step: int | None = None) -> Path:
    """Write `tree` to the folder `path` (created, with its parents) and return it as an absolute path.

    tree: any pytree of jax / NumPy arrays and Python scalars.
    step: an int >= 0 recorded beside the arrays (read it back with `checkpoint_step`), or None.
    Atomic: the new checkpoint is complete on disk before it takes `path`'s name, and an existing
    checkpoint at `path` is replaced only then. A `path` that exists and is neither a checkpoint nor
    an empty folder is refused (FileExistsError): nothing already written is lost.
    Blocks until the files are written. Every process of a multi-host run calls it.
    """
    path = Path(path).absolute()
    if step is not None:
        try:
            step = operator.index(step)  # ints, NumPy integers, 0-d integer arrays
        except TypeError:
            step = -1
        if step < 0:
            raise ValueError(f"save: step must be an int >= 0 or None, not {step!r}")
    if path.exists() and not (path.is_dir() and (is_checkpoint(path) or not any(path.iterdir()))):
        raise FileExistsError(f"save: {path} exists and is not a checkpoint; refusing to overwrite it "
                              f"(name a new path, or remove it first)")
    _check_saveable(tree)
    token = uuid.uuid4().hex[:8]
    staging = path.with_name(f"{path.name}.llmjax-saving-{token}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _folder_checkpointer() as checkpointer:
            checkpointer.save(staging, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(tree), RECORD: ocp.args.JsonSave({"step": step})}))
    except BaseException:
        if jax.process_index() == 0:  # the half-written copy (orbax's temporary folder) goes; `path` is untouched
            _remove_partial_copies(path.parent, staging.name)
        raise
    if jax.process_index() == 0:
        _replace_folder(path, staging, token)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"llmjax.save {path}")
    return path


SAVEABLE_LEAVES = (jax.Array, np.ndarray, np.generic, int, float, str)


def _check_saveable(tree) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, SAVEABLE_LEAVES):
            name = "/".join(_key_name(key) for key in path) or "<root>"
            raise TypeError(f"save: the leaf at '{name}' is a {type(leaf).__name__}; a checkpoint holds jax or "
                            f"NumPy arrays, Python numbers and strings")


def _remove_partial_copies(folder: Path, prefix: str) -> None:
    """Delete the folders named prefix* (orbax may still be creating its item folders: retry a moment)."""
    for _ in range(50):
        partial = list(folder.glob(f"{prefix}*"))
        if not partial:
            return
        for leftover in partial:
            shutil.rmtree(leftover, ignore_errors=True)
        time.sleep(0.02)


def _replace_folder(path: Path, complete: Path, token: str) -> None:
    """Give the complete folder `path`'s name; an old checkpoint there is moved aside first, then deleted."""
    if not path.exists():
        complete.rename(path)
        return
    if not any(path.iterdir()):
        path.rmdir()
        complete.rename(path)
        return
    old = path.with_name(f"{path.name}.llmjax-replaced-{token}")
    path.rename(old)
    complete.rename(path)
    shutil.rmtree(old)


def _existing_checkpoint(path: str | Path) -> Path:
    path = Path(path).absolute()
    if is_checkpoint(path):
        return path
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    unfinished = sorted(path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*")) + sorted(
        path.parent.glob(f"{path.name}.llmjax-saving-*"))
    hint = f" (an unfinished save left {unfinished[0].name} beside it)" if unfinished else ""
    raise FileNotFoundError(f"no checkpoint at {path}: the folder has no {METADATA_FILE} and {STATE}/{hint}")


def checkpoint_step(path: str | Path) -> int | None:
    """The step `save` recorded at `path` (None if it was saved without one)."""
    path = _existing_checkpoint(path)
    with _folder_checkpointer() as checkpointer:
        record = checkpointer.restore(path, args=ocp.args.Composite(**{RECORD: ocp.args.JsonRestore()}))[RECORD]
    return record.get("step")


def _key_name(key) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_shapes(tree) -> dict[str, tuple]:
    """{'params/w': (3, 5), ...}: one entry per leaf, named by its path (dict keys, indices, field names)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(key) for key in path) or "<root>": tuple(np.shape(leaf)) for path, leaf in leaves}


def _first_difference(saved_shapes: dict, like_shapes: dict) -> str | None:
    for name, shape in like_shapes.items():
        if name not in saved_shapes:
            return f"`like` has '{name}' (shape {shape}), which the checkpoint lacks"
        if saved_shapes[name] != shape:
            return f"at '{name}' the checkpoint holds shape {saved_shapes[name]}, `like` has shape {shape}"
    for name, shape in saved_shapes.items():
        if name not in like_shapes:
            return f"the checkpoint holds '{name}' (shape {shape}), which `like` lacks"
    return None


def _saved_array(metadata):
    """The restore target that gives a leaf back as it was saved (see `restore`)."""
    if isinstance(metadata, ocp_metadata.ScalarMetadata):  # (a subclass of ArrayMetadata: test it first)
        return np.dtype(metadata.dtype).type(0).item()  # a Python int / float / bool
    if isinstance(metadata, ocp_metadata.StringMetadata):
        return ""
    if isinstance(metadata, ocp_metadata.ArrayMetadata):
        if metadata.sharding is None:  # saved from NumPy
            return jax.ShapeDtypeStruct(metadata.shape, metadata.dtype)
        return jax.ShapeDtypeStruct(metadata.shape, metadata.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return metadata


def _like_target(leaf):
    """A restore target from a leaf of `like`: its shape, dtype and sharding."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return leaf  # a ShapeDtypeStruct with its sharding, a NumPy array (restored as NumPy), a Python scalar


def restore(path: str | Path, like=None):
    """The tree saved at `path`.

    like=None: as saved: the same containers (NamedTuples as namedtuples with the same fields;
      pass `like` to get the original class), jax arrays as jax arrays on the default device
      (jax.devices()[0]), NumPy arrays as NumPy arrays, Python scalars as Python scalars.
    like: a pytree of jax arrays, NumPy arrays, Python scalars or jax.ShapeDtypeStruct with the
      saved structure and shapes: each leaf comes back with like's container types, dtype (cast
      from the saved one) and sharding (a ShapeDtypeStruct without one: the default device);
      NumPy leaves come back as NumPy. A `like` whose paths or shapes differ from the checkpoint
      raises CheckpointError naming the first differing path and both shapes.
    The step, if saved, is `checkpoint_step(path)`. Missing path: FileNotFoundError.
    """
    path = _existing_checkpoint(path)
    with _folder_checkpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata[STATE].tree
        if like is None:
            target = jax.tree.map(_saved_array, saved)
        else:
            difference = _first_difference(leaf_shapes(saved), leaf_shapes(like))
            if difference:
                raise CheckpointError(f"restore: the checkpoint at {path} does not match `like`: {difference}")
            target = jax.tree.map(_like_target, like)
        restored = checkpointer.restore(path, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)}))
    return restored[STATE]


class Checkpointer:
    """Save and restore training state under one run directory (`run/checkpoints/<step>/`)."""

    def __init__(self, directory: str | Path, *, keep_last: int = 3, keep_best: int = 1, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = preservation_policy.AnyPreservationPolicy(
            [
                preservation_policy.LatestN(keep_last),
                preservation_policy.BestN(
                    get_metric_fn=lambda metrics: metrics["val_loss"],
                    reverse=True,  # sorted high to low; the last n, the lowest losses, are kept
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=handler_registry())

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, state, *, record: dict, val_loss: float | None = None) -> None:
        """Start saving `state` at its step (returns before the write finishes when async).

        record: JSON-ready dict (configs, loader position, seed); the step is added to it, so
        `checkpoint_step` reads it like any `save`. val_loss ranks it for keep-best.
        """
        step = int(state.step)
        record = {**record, "step": step}
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(
            step,
            args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), RECORD: ocp.args.JsonSave(record)}),
            metrics=metrics,
            force=True,
        )

    def restore_latest(self, abstract_state, model_cfg: ModelConfig):
        """(state, record) of the newest readable checkpoint, or None when there is none.

        abstract_state: the TrainState's tree of jax.ShapeDtypeStruct (with shardings: orbax
        lays the arrays out as they say, so a run may resume on another mesh).
        """
        for step in reversed(self.steps()):
            try:
                record = self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
            except Exception as error:  # noqa: BLE001  (any unreadable file means: try an older one)
                self._fall_back(step, error)
                continue
            differences = config_differences(record.get("model_config", {}), model_cfg)
            if differences:
                raise CheckpointError(
                    f"checkpoint at step {step} in {self.directory} was written by a different model config "
                    f"({'; '.join(differences)}); resume with the same model settings or start a new run folder"
                )
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as error:  # noqa: BLE001
                self._fall_back(step, error)
                continue
            return restored["state"], record
        return None

    def _fall_back(self, step: int, error: Exception) -> None:
        older = [s for s in self.steps() if s < step]
        target = f"falling back to step {older[-1]}" if older else "no older checkpoint to fall back to"
        log.warning("checkpoint at step %d in %s is unreadable (%s: %s); %s",
                    step, self.directory, type(error).__name__, str(error).splitlines()[0] if str(error) else "", target)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_train_state(state):
    """Shape/dtype/sharding skeleton of a TrainState, for restoring without a template copy."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def run_record(model_cfg, train_cfg, *, loader_state: dict, seed: int, extra: dict | None = None) -> dict:
    """The JSON record saved with every checkpoint."""
    return {
        "model_config": config_to_dict(model_cfg),
        "train_config": config_to_dict(train_cfg),
        "loader_state": loader_state,
        "seed": seed,
        **(extra or {}),
    }
