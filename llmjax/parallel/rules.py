"""One table from logical axis names to mesh axes, with named presets.

Layers declare logical axes next to their shapes (llmjax.model.params) and constrain activations
by logical name (llmjax.parallel.logical); a Strategy says which mesh axes shard each kind of array:
parameters, gradients, optimizer state and activations. Changing data / ZeRO / FSDP / tensor /
sequence parallelism is a change of mesh and strategy, not of code. Mesh axes of size 1 drop out,
so every strategy runs on any mesh (e.g. "fsdp" on `data=8` is plain data parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding

from llmjax.model.params import flatten_with_names, is_spec, path_name
from llmjax.parallel.logical import Rules, axis_ways, partition_spec

__all__ = ["STRATEGIES", "Rules", "ShardingError", "Strategy", "describe", "get_strategy", "partition_spec",
           "spec_shardings"]


@dataclass(frozen=True)
class Strategy:
    """Logical-axis rules for each kind of array a training step holds."""

    name: str
    params: Rules
    gradients: Rules
    optimizer: Rules
    activations: Rules


_BATCH: Rules = {"batch": ("data", "fsdp", "expert")}  # every data-like axis splits the batch
_EXPERTS: Rules = {"expert": "expert"}
_FSDP: Rules = {"embed": "fsdp", **_EXPERTS}  # ZeRO-3: each weight cut along its model dimension
_ZERO: Rules = {"embed": ("data", "fsdp"), **_EXPERTS}  # ZeRO-1/2: over all data-parallel ranks
_TENSOR: Rules = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}  # Megatron
_SEQUENCE: Rules = {**_BATCH, "length": "sequence"}


def _strategy(name: str, weights: Rules, *, gradients: Rules | None = None, optimizer: Rules | None = None,
              activations: Rules = _BATCH) -> Strategy:
    gradients = weights if gradients is None else gradients
    return Strategy(name, weights, gradients, weights if optimizer is None else optimizer, activations)


STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in [
        _strategy("dp", _EXPERTS),
        _strategy("zero1", _EXPERTS, gradients=_EXPERTS, optimizer=_ZERO),
        _strategy("zero2", _EXPERTS, gradients=_ZERO, optimizer=_ZERO),
        _strategy("fsdp", _FSDP),
        _strategy("tp", {**_EXPERTS, **_TENSOR}),
        _strategy("fsdp+tp", {**_FSDP, **_TENSOR}),
        _strategy("sp", _FSDP, activations=_SEQUENCE),
        # every axis the mesh has: FSDP over fsdp, Megatron over tensor, ring attention over sequence
        _strategy("auto", {**_FSDP, **_TENSOR}, activations=_SEQUENCE),
    ]
}


def get_strategy(name: str | Strategy) -> Strategy:
    if isinstance(name, Strategy):
        return name
    if name not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


class ShardingError(ValueError):
    """Rules that cannot shard a parameter on this mesh."""


def spec_shardings(spec_tree, mesh: Mesh, rules: Rules | str):
    """NamedSharding for every leaf of a ParamSpec tree, after checking that each sharded dimension divides.

    rules: a rules table, or a strategy name (its parameter rules).
    """
    rules = get_strategy(rules).params if isinstance(rules, str) else rules

    def sharding(path, spec):
        pspec = partition_spec(spec.axes, rules, mesh)
        for size, axis, entry in zip(spec.shape, spec.axes, pspec):
            ways = axis_ways(entry, mesh)
            if size % ways:
                mesh_axes = (entry,) if isinstance(entry, str) else tuple(entry)
                raise ShardingError(
                    f"parameter {path_name(path)!r}: its {axis!r} dimension of {size} does not divide over mesh "
                    f"axes {mesh_axes} of size {ways}; change the mesh or the model size"
                )
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(sharding, spec_tree, is_leaf=is_spec)


def describe(shardings) -> dict[str, tuple]:
    """{'blocks/attn/q/kernel': (None, 'fsdp', 'tensor', None), ...}: each leaf's mesh axes per dimension."""
    return {name: tuple(sharding.spec) for name, sharding in flatten_with_names(shardings).items()}
