"""µP, the maximal update parametrization (Yang et al., "Tensor Programs V", Table 3, Adam column), as multipliers on
the standard parametrization: `ModelConfig(mup_base_width=B)` trains a model of width d_model so that the best
learning rate found at width B transfers to it.

Width multiplier m = d_model / B. Each parameter is classified by which of its dimensions grow with the width: its
shape against the same parameter of the base model (`mup_base_config`: d_model = B, heads, kv heads, d_ff and the
experts' width scaled by 1/m, head_dim kept), leading `layers` axes aside:

    kind         dims that grow              examples                         init std     Adam lr
    hidden       two or more                 q, k, v, o, MLP, expert kernels  x 1/sqrt(m)  x 1/m
    output       one, the first (fan-in)     lm_head, MoE router              x 1/m        x 1/m
    vector       one, not the first; none;   token / position embeddings,     x 1          x 1
                 or a bias / norm scale      norm scales, biases

and the attention logits are q.k / head_dim instead of q.k / sqrt(head_dim) (q times 1 / sqrt(head_dim) in
llmjax.model.attention.project_qkv, so every attention path sees it). At width B the parameters and learning rates
are the standard ones; only the attention scale differs. A tied output head would have to be both an input and an
output weight: µP needs tie_embeddings=False (ModelConfig checks it).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from llmjax.config import ModelConfig
from llmjax.model.params import ParamSpec, is_spec, path_name

VECTOR_LEAVES = ("bias", "scale")  # biases and norm gains: vector-like whatever their shape


def width_multiplier(cfg: ModelConfig) -> float:
    """m = d_model / mup_base_width (1.0 under the standard parametrization)."""
    return cfg.d_model / cfg.mup_base_width if cfg.mup_base_width else 1.0


def _scaled(value: int | None, ratio: float) -> int | None:
    """A width-proportional size of the base model (at least 1: a size that stays 1, such as a single kv head, then
    does not grow with the width, and the weights it shapes are classified accordingly)."""
    return None if value is None else max(1, round(value * ratio))


def mup_base_config(cfg: ModelConfig) -> ModelConfig:
    """The base model µP is relative to: d_model = mup_base_width, heads, kv heads, d_ff and expert widths scaled
    with it, head_dim and everything else kept."""
    ratio = cfg.mup_base_width / cfg.d_model
    return dataclasses.replace(cfg, d_model=cfg.mup_base_width, num_heads=_scaled(cfg.num_heads, ratio),
                               num_kv_heads=_scaled(cfg.num_kv_heads, ratio), head_dim=cfg.head_dim,
                               d_ff=_scaled(cfg.d_ff, ratio), expert_d_ff=_scaled(cfg.expert_d_ff, ratio),
                               mup_base_width=0)


def parameter_kind(name: str, spec: ParamSpec, base: ParamSpec) -> str:
    """'hidden', 'output' or 'vector' (the module docstring's table) for the parameter at path `name`."""
    if name.rsplit("/", 1)[-1] in VECTOR_LEAVES:
        return "vector"
    dims = [i for i, axis in enumerate(spec.axes) if axis != "layers"]
    growing = [i for i in dims if spec.shape[i] != base.shape[i]]
    if len(growing) >= 2:
        return "hidden"
    if len(growing) == 1 and growing[0] == dims[0] and len(dims) >= 2:
        return "output"
    return "vector"


def parameter_kinds(spec: dict, base_spec: dict) -> dict:
    """{parameter path: kind} from a model's spec tree and its base model's (`mup_base_config`)."""
    base = {path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(base_spec, is_leaf=is_spec)}
    return {path_name(p): parameter_kind(path_name(p), s, base[path_name(p)])
            for p, s in jax.tree_util.tree_leaves_with_path(spec, is_leaf=is_spec)}


INIT_POWER = {"hidden": 0.5, "output": 1.0, "vector": 0.0}  # init std x m ** -power
LR_POWER = {"hidden": 1.0, "output": 1.0, "vector": 0.0}  # Adam learning rate x m ** -power


def multipliers(cfg: ModelConfig, spec: dict, base_spec: dict, of: str) -> dict:
    """The params' tree of factors m ** -power[kind] on the standard init's values (of="init": x m^-1/2 hidden, x m^-1
    output) or on the Adam learning rate (of="lr": x m^-1 hidden and output); all 1.0 under the standard
    parametrization. spec / base_spec: model_spec of the model and of mup_base_config(cfg)
    (llmjax.model.transformer.mup_multipliers passes them)."""
    powers = {"init": INIT_POWER, "lr": LR_POWER}[of]
    if not cfg.mup_base_width:
        return jax.tree.map(lambda s: 1.0, spec, is_leaf=is_spec)
    kinds, m = parameter_kinds(spec, base_spec), width_multiplier(cfg)
    return jax.tree_util.tree_map_with_path(lambda p, s: m ** -powers[kinds[path_name(p)]], spec, is_leaf=is_spec)


def scale_updates(multipliers: dict) -> optax.GradientTransformation:
    """Updates times a fixed tree of per-parameter factors: after AdamW, a per-parameter learning rate (the decoupled
    weight decay, -lr * wd * param, scales with it, as in µP's Adam)."""

    def init(params):
        if jax.tree.structure(params) != jax.tree.structure(multipliers):
            raise ValueError("µP learning-rate multipliers: the trained parameters are not the model's (a µP model "
                             "trains all of its parameters; LoRA adapters are not µP-scaled)")
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, k: u * k, updates, multipliers), state

    return optax.GradientTransformation(init, update)


__all__ = ["multipliers", "mup_base_config", "parameter_kind", "parameter_kinds", "scale_updates", "width_multiplier"]
