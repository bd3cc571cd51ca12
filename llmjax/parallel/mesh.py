"""Device meshes from axis sizes: `--mesh data=2,fsdp=-1,tensor=2` -> a jax Mesh.

Axes, outermost first: data, fsdp, sequence, expert, tensor. jax.make_mesh orders devices by
topology, so the innermost axis (tensor, the most communication-hungry) lands on the fastest links.
Axes not named have size 1; one axis may be -1, meaning "all the devices left".
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "sequence", "expert", "tensor")


class MeshError(ValueError):
    """Mesh sizes that do not fit the devices."""


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=-1' -> {'data': 2, 'fsdp': -1}."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in MESH_AXES:
            raise MeshError(f"--mesh item {item!r}: expected AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
        if name in sizes:
            raise MeshError(f"--mesh names axis {name!r} twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"--mesh {name}={value!r}: the size must be an integer (or -1 for the rest)") from None
    return sizes


def mesh_shape(sizes: dict[str, int], device_count: int) -> dict[str, int]:
    """Every axis's size, with the -1 axis filled so that the product is the device count."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {', '.join(MESH_AXES)}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {fill}")
    bad = {name: size for name, size in sizes.items() if size < 1 and size != -1}
    if bad:
        raise MeshError(f"mesh axis sizes must be positive (or one -1), got {bad}")
    shape = {name: sizes.get(name, 1) for name in MESH_AXES}
    fixed = math.prod(size for size in shape.values() if size != -1)
    if fill:
        if device_count % fixed:
            raise MeshError(f"the other mesh axes multiply to {fixed}, which does not divide the {device_count} devices")
        shape[fill[0]] = device_count // fixed
    elif fixed != device_count:
        named = ", ".join(f"{name}={size}" for name, size in shape.items() if size > 1) or "all axes 1"
        raise MeshError(f"mesh {named} has {fixed} devices but there are {device_count}; "
                        f"make the sizes multiply to {device_count} or give one axis as -1")
    return shape


def make_mesh(sizes: dict[str, int] | str | None = None, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with every axis of MESH_AXES (size 1 when not named)."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(sizes) if isinstance(sizes, str) else (sizes or {"data": -1})
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(tuple(shape.values()), MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))
