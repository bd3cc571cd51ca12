"""Training: optax optimizer and schedules, the jitted train step, orbax checkpoints, the loop.

The pieces usable on any pytree, not only llmjax models:
    make_optimizer(train_cfg, *, weight_decay_mask=None, model_cfg=None)   clipping + AdamW (optim.py)
    cosine_schedule, linear_schedule, wsd_schedule, constant_schedule,
    make_schedule                                                        step -> lr (schedules.py)
    save(path, tree, step=None), restore(path, like=None), checkpoint_step(path)   (checkpoint.py)
and for llmjax models: weight_decay_mask(model_cfg, train_cfg), Checkpointer (a run folder).
TrainConfig (llmjax.config) is re-exported: make_optimizer reads its optimizer and schedule fields.
"""

from llmjax.config import TrainConfig
from llmjax.train.checkpoint import Checkpointer, checkpoint_step, restore, save
from llmjax.train.optim import make_optimizer, weight_decay_mask
from llmjax.train.schedules import constant_schedule, cosine_schedule, linear_schedule, make_schedule, wsd_schedule

__all__ = [
    "Checkpointer",
    "TrainConfig",
    "checkpoint_step",
    "constant_schedule",
    "cosine_schedule",
    "linear_schedule",
    "make_optimizer",
    "make_schedule",
    "restore",
    "save",
    "weight_decay_mask",
    "wsd_schedule",
]
