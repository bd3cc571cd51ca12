"""Logical axis names -> mesh axes, and the activation constraints that layers write by logical name.

A layer says `constrain(x, ("batch", "length", "embed"))`; whether and how that shards depends on
the rules made active around the traced function (`with activation_rules(mesh, rules): ...`).
Outside such a block `constrain` returns its input unchanged, so the model runs the same on one
device. This module imports nothing from the model, so the model may import it.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis (or axes); a logical axis not listed is replicated.
Rules = dict[str, str | tuple[str, ...]]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("activation_rules", default=None)


def partition_spec(axes: tuple[str | None, ...], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array's logical axes; mesh axes of size 1 and repeats are dropped."""
    used: set[str] = set()
    entries = []
    for axis in axes:
        mesh_axes = rules.get(axis, ()) if axis is not None else ()
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        kept = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*entries)


def axis_ways(entry, mesh: Mesh) -> int:
    """How many pieces one PartitionSpec entry cuts its dimension into."""
    mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    ways = 1
    for mesh_axis in mesh_axes:
        ways *= mesh.shape[mesh_axis]
    return ways


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules):
    """Within this block (while tracing), `constrain` lays activations out on `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules] | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """x with a sharding constraint from its logical axes under the active rules (else x itself).

    A dimension whose size the mesh axes do not divide is left unsharded rather than padded.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = partition_spec(axes, rules, mesh)
    spec = PartitionSpec(*(entry if size % axis_ways(entry, mesh) == 0 else None for size, entry in zip(x.shape, spec)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def mesh_axis_for(logical_axis: str) -> str | None:
    """The one mesh axis (size > 1) that the active rules shard `logical_axis` over, if any."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    entry = partition_spec((logical_axis,), rules, mesh)[0]
    if entry is None:
        return None
    if not isinstance(entry, str):
        raise ValueError(f"logical axis {logical_axis!r} is sharded over several mesh axes {entry}; use one")
    return entry
