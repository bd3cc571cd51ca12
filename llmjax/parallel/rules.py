"""One table from logical axis names to mesh axes, with named presets.

Layers declare logical axes next to their shapes (llmjax.model.params); these rules decide which mesh
axes shard them. Changing data / FSDP / tensor parallelism is a change of mesh and rules, not of code.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.model.params import flatten_with_names, is_spec, path_name

# logical axis -> mesh axis (or axes); a logical axis not listed is replicated.
Rules = dict[str, str | tuple[str, ...]]

RULES: dict[str, Rules] = {
    "dp": {"batch": "data"},
    "fsdp": {"batch": ("data", "fsdp"), "embed": "fsdp"},
    "tp": {"batch": "data", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
    "fsdp+tp": {"batch": ("data", "fsdp"), "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
                "mlp": "tensor", "vocab": "tensor"},
    "sp": {"batch": ("data", "fsdp"), "embed": "fsdp", "length": "sequence"},
}


class ShardingError(ValueError):
    """Rules that cannot shard a parameter on this mesh."""


def partition_spec(axes: tuple[str, ...], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array's logical axes; mesh axes of size 1 and repeats are dropped."""
    used: set[str] = set()
    entries = []
    for axis in axes:
        mesh_axes = rules.get(axis, ())
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        kept = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*entries)


def spec_shardings(spec_tree, mesh: Mesh, rules: Rules | str):
    """NamedSharding for every leaf of a ParamSpec tree, after checking that each sharded dimension divides."""
    rules = RULES[rules] if isinstance(rules, str) else rules

    def sharding(path, spec):
        pspec = partition_spec(spec.axes, rules, mesh)
        for size, axis, entry in zip(spec.shape, spec.axes, pspec):
            mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            ways = 1
            for mesh_axis in mesh_axes:
                ways *= mesh.shape[mesh_axis]
            if size % ways:
                raise ShardingError(
                    f"parameter {path_name(path)!r}: its {axis!r} dimension of {size} does not divide over mesh "
                    f"axes {mesh_axes} of size {ways}; change the mesh or the model size"
                )
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(sharding, spec_tree, is_leaf=is_spec)


def describe(shardings) -> dict[str, tuple]:
    """{'blocks/attn/q/kernel': (None, 'fsdp', 'tensor', None), ...}: each leaf's mesh axes per dimension."""
    return {name: tuple(sharding.spec) for name, sharding in flatten_with_names(shardings).items()}
