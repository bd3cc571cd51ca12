"""Parameter specs: the one place that declares each parameter's shape, initializer and logical axes.

Every layer exposes a `*_spec(cfg)` function returning a nested dict of `ParamSpec`.
Initialization, counting, sharding (logical axes -> mesh axes), LoRA targeting and
quantization all read these trees; nothing else invents a parameter.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dimension: ("embed", "mlp")
    init: Initializer
    dtype: str = "float32"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), f"shape {self.shape} and axes {self.axes} differ in rank"


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def stack_layers(spec_tree, num_layers: int):
    """Specs for `num_layers` copies stacked on a leading `layers` axis (for lax.scan)."""
    return jax.tree.map(
        lambda s: ParamSpec((num_layers, *s.shape), ("layers", *s.axes), s.init, s.dtype),
        spec_tree,
        is_leaf=is_spec,
    )


def path_name(path) -> str:
    """'blocks/attn/q/kernel' for a jax tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def init_from_specs(spec_tree, key: jax.Array):
    """Initialize every parameter of a spec tree.

    Each leaf draws from `fold_in(key, crc32(path))`, so a parameter's initial value depends
    only on the key and its own name, not on which other parameters exist.
    """

    def init_leaf(path, spec: ParamSpec):
        leaf_key = jax.random.fold_in(key, zlib.crc32(path_name(path).encode()))
        return spec.init(leaf_key, spec.shape, jnp.dtype(spec.dtype))

    return jax.tree_util.tree_map_with_path(init_leaf, spec_tree, is_leaf=is_spec)


def shapes_from_specs(spec_tree):
    """The tree of `jax.ShapeDtypeStruct` the specs describe (no allocation)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)), spec_tree, is_leaf=is_spec)


def logical_axes(spec_tree):
    """The tree of logical axis-name tuples, same structure as the params."""
    return jax.tree.map(lambda s: s.axes, spec_tree, is_leaf=is_spec)


def count_from_specs(spec_tree) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(spec_tree, is_leaf=is_spec))


def flatten_with_names(tree) -> dict[str, object]:
    """{'blocks/attn/q/kernel': leaf, ...} for any params-shaped tree."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)
    return {path_name(path): leaf for path, leaf in leaves}
