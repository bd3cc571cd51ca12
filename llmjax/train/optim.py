"""AdamW through optax for any pytree: the run's schedule, global-norm clipping, a weight-decay mask.

For an llmjax model the mask comes from the parameter specs (matrices decay; norms, biases and
embeddings do not); for any other pytree it is given as a tree of bools or a predicate, or
defaults to decaying every array with two or more dimensions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from llmjax.config import ModelConfig, TrainConfig
from llmjax.model.params import is_spec, path_name
from llmjax.model.transformer import model_spec
from llmjax.nn.clip import clip_by_global_norm
from llmjax.train.schedules import Schedule, make_schedule

EMBEDDING_AXES = {"vocab", "length"}  # token and position embeddings, and the (untied) output embedding

# (key path, leaf) -> decay?  The key path is the one jax.tree_util.tree_map_with_path gives
# (jax.tree_util.keystr(path) spells it); the leaf is the parameter, or its update (same shape).
DecayPredicate = Callable[[tuple, jax.Array], bool]


def learning_rate_schedule(cfg: TrainConfig) -> Schedule:
    """step -> learning rate: linear warmup from 0 to cfg.lr, then the chosen decay to lr * min_lr_ratio."""
    return make_schedule(cfg.schedule, max_lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio, warmup=cfg.warmup_steps,
                         total=cfg.total_steps, decay_fraction=cfg.decay_fraction)


def weight_decay_mask(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """A params-shaped tree of bools for an llmjax model: True where weight decay applies.

    Linear-layer kernels decay; norms and biases never do; embeddings (parameters with a `vocab`
    or `length` axis, the untied output layer included) decay only with decay_embeddings.
    """

    def decays(path, spec) -> bool:
        is_embedding = bool(EMBEDDING_AXES & set(spec.axes))
        if is_embedding:
            return train_cfg.decay_embeddings
        return path_name(path).endswith("kernel")

    return jax.tree_util.tree_map_with_path(decays, model_spec(model_cfg), is_leaf=is_spec)


def decays_matrices(path, leaf) -> bool:
    """The default predicate for pytrees that are not llmjax models: decay arrays with ndim >= 2."""
    return leaf.ndim >= 2


def _first_structure_difference(mask, params) -> str:
    """Where a mask tree and the params disagree, in words (called only when their structures differ)."""
    mask_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(mask)[0]]
    param_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    lacking = [path for path in param_paths if path not in set(mask_paths)]
    extra = [path for path in mask_paths if path not in set(param_paths)]
    problems = ([f"the params have {lacking[0]}, which the mask lacks"] if lacking else []) + (
        [f"the mask has {extra[0]}, which the params lack"] if extra else [])
    if problems:
        return "; ".join(problems)
    return (f"the same paths but other containers: mask {jax.tree.structure(mask)}, "
            f"params {jax.tree.structure(params)}")


def _mask_function(weight_decay_mask, model_cfg: ModelConfig | None, train_cfg: TrainConfig):
    """params -> tree of bools, for optax's `mask=`, from whichever form of mask was given."""
    if weight_decay_mask is not None and model_cfg is not None:
        raise ValueError("make_optimizer: pass weight_decay_mask or model_cfg, not both "
                         "(model_cfg only selects the llmjax model's spec-derived mask)")
    if model_cfg is not None:
        weight_decay_mask = _spec_weight_decay_mask(model_cfg, train_cfg)
    if weight_decay_mask is None:
        weight_decay_mask = decays_matrices
    if callable(weight_decay_mask):
        predicate = weight_decay_mask
        return lambda params: jax.tree_util.tree_map_with_path(lambda path, leaf: bool(predicate(path, leaf)), params)
    mask_tree = weight_decay_mask

    def checked_mask(params):
        if jax.tree.structure(mask_tree) != jax.tree.structure(params):
            raise ValueError(f"make_optimizer: the weight-decay mask does not match the params' structure: "
                             f"{_first_structure_difference(mask_tree, params)}; give one bool per parameter "
                             f"array, in the same nested containers")
        return mask_tree

    return checked_mask


_spec_weight_decay_mask = weight_decay_mask  # make_optimizer's keyword of the same name hides it there


def clipping(max_norm: float) -> optax.GradientTransformation:
    """llmjax.nn.clip_by_global_norm as an optax transformation (stateless, like optax's own)."""

    def update(updates, state, params=None):
        del params
        clipped, _ = clip_by_global_norm(updates, max_norm)
        return clipped, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_cfg: TrainConfig, *, weight_decay_mask=None, model_cfg: ModelConfig | None = None
                   ) -> optax.GradientTransformation:
    """Global-norm clipping (train_cfg.grad_clip; None: off), then AdamW with the run's schedule.

    Which parameters decay (decoupled: -lr * weight_decay * param) is, by the first that applies:
      weight_decay_mask: a tree of bools with exactly the params' structure, or a predicate
                         (key path, leaf) -> bool over jax.tree_util key paths, e.g.
                         lambda path, leaf: not jax.tree_util.keystr(path).endswith("['bias']");
      model_cfg:         the llmjax model's spec-derived mask, weight_decay_mask(model_cfg, train_cfg);
      neither:           every array with ndim >= 2 (matrices and stacked matrices; no biases or scales).
    A mask tree whose structure differs from the params fails in `init` with the first differing path.
    A µP model (model_cfg.mup_base_width > 0) gets its per-parameter learning rates (llmjax.model.mup) after AdamW.
    """
    if isinstance(train_cfg, ModelConfig):
        raise TypeError("make_optimizer(train_cfg, *, weight_decay_mask=None, model_cfg=None): for an llmjax model "
                        "call make_optimizer(train_cfg, model_cfg=model_cfg)")
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(train_cfg),
        b1=train_cfg.beta1,
        b2=train_cfg.beta2,
        eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
        mask=_mask_function(weight_decay_mask, model_cfg, train_cfg),
    )
    if model_cfg is not None and model_cfg.mup_base_width:
        from llmjax.model.mup import scale_updates
        from llmjax.model.transformer import mup_multipliers

        adamw = optax.chain(adamw, scale_updates(mup_multipliers(model_cfg, "lr")))
    if train_cfg.grad_clip is None:
        return adamw
    return optax.chain(clipping(train_cfg.grad_clip), adamw)
