"""RoPE as the model applies it: llmjax.nn.rope with the config's theta, scaling and pair layout."""

from __future__ import annotations

import re

import jax

from llmjax.config import ModelConfig
from llmjax.nn import rope, rope_layout_permutation


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x [batch, seq, heads, head_dim] rotated at positions [batch, seq] (angles in float32)."""
    return rope(x, positions, theta=cfg.rope_theta, scaling=cfg.rope_scaling, layout=cfg.rope_layout)


def convert_rope_layout(params: dict, cfg: ModelConfig, layout: str) -> tuple[dict, ModelConfig]:
    """The same model with RoPE in `layout`: (params with the q / k projections' head_dim axis permuted,
    cfg.replace(rope_layout=layout)). Logits are unchanged (up to float rounding of the rotation)."""
    order = rope_layout_permutation(cfg.head_dim, cfg.rope_layout, layout)

    def convert(path, leaf):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        rotated = re.search(r"attn/(q|k)/(kernel|bias)$", name) and cfg.positions == "rope"
        return leaf[..., order] if rotated else leaf  # head_dim is the last axis of q / k kernels and biases

    return jax.tree_util.tree_map_with_path(convert, params), cfg.replace(rope_layout=layout)
