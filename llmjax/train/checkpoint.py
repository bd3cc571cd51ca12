"""Checkpoints on orbax: asynchronous, atomic, keeping the last K plus the best by validation loss.

A checkpoint holds the TrainState (params, optimizer state, step) and a JSON record of what is
needed to continue exactly: the model and train configs, the data loader's position and the
seed. orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact. Restoring walks back from the newest step past
any that cannot be read, saying so; a checkpoint of a different model is an error, not skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from llmjax.config import ModelConfig, config_differences, config_to_dict

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used for this run."""


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
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, state, *, record: dict, val_loss: float | None = None) -> None:
        """Start saving `state` at its step (returns before the write finishes when async).

        record: JSON-ready dict (configs, loader position, seed). val_loss ranks it for keep-best.
        """
        step = int(state.step)
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
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
