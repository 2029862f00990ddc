"""The one place that decides sharding: logical axis names -> mesh axes (data, fsdp, tensor).

Every parameter and activation is annotated with logical axis names (``vocab``, ``embed``,
``mlp``, ``heads``, ...). ``LOGICAL_AXIS_RULES`` maps each name to an ordered tuple of mesh
axes; ``logical_to_spec`` turns a tuple of logical names into a ``PartitionSpec`` for a
concrete shape, skipping mesh axes already used by an earlier dimension or that do not divide
the dimension evenly (so a 50257-row vocabulary stays unsharded on that axis instead of
failing). The same model code then runs on one CPU device, a simulated mesh or a TPU pod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from clp_jax.config import ConfigModel
from clp_jax.errors import ClpError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axes, tried in order. Parameters are replicated over `data`,
# sharded over `fsdp` (ZeRO-3 style) and `tensor` (Megatron style).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "vocab": ("tensor", "fsdp"),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "qkv": (),
    "norm": (),
}


class MeshConfig(ConfigModel):
    """Mesh sizes along (data, fsdp, tensor); one may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices``; one axis may be -1 to take the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ClpError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ClpError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ClpError(f"mesh: {dict(zip(MESH_AXES, sizes))} does not divide the {n} available devices")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ClpError(
            f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {n} devices are available "
            f"(got {dict(zip(MESH_AXES, sizes))}; use -1 on one axis to fill the rest)"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
    rules: Mapping[str, tuple[str, ...]] = LOGICAL_AXIS_RULES, first: int | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions carry ``logical_axes``.

    Dimensions claim their mesh axes left to right; ``first`` names a dimension that claims before the others
    (the loss puts the vocabulary first, so logits split like the output layer they come from).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    order = list(range(len(shape)))
    if first is not None:
        order.insert(0, order.pop(first % len(shape)))
    used: set[str] = set()
    spec: list[Any] = [None] * len(shape)
    for i in order:
        name, dim = logical_axes[i], shape[i]
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        chosen: list[str] = []
        size = 1
        for axis in rules.get(name, ()) if name else ():
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            chosen.append(axis)
            size *= n
        used.update(chosen)
        spec[i] = None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen)
    return PartitionSpec(*spec)


def named_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """NamedSharding for one array from its logical axes."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], first: int | None = None) -> jax.Array:
    """Pin an intermediate's sharding by the rules table, under ``jax.sharding.use_abstract_mesh``; else ``x``.

    Train and eval steps trace under their mesh, so activations keep the batch sharding XLA might otherwise
    trade for the parameters' (fsdp) layout; model code stays mesh-agnostic.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, first=first))


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree, given matching trees of logical axes and shapes/arrays."""
    shapes = jax.tree.map(lambda x: tuple(x.shape), shapes_tree)
    return jax.tree.map(
        lambda axes, shape: named_sharding(axes, shape, mesh),
        axes_tree, shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x),
    )


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding for a [batch, length, ...] input array, from the same rules table."""
    return named_sharding(("batch", "length") + (None,) * (len(shape) - 2), shape, mesh)


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this: the devices along the mesh axes the rules table gives
    ``batch``."""
    return math.prod(mesh.shape[axis] for axis in LOGICAL_AXIS_RULES["batch"] if axis in mesh.shape)


def global_batch(rows: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows -> global arrays (every host's rows together) sharded over the batch axes."""
    out = {}
    for k, v in rows.items():
        global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape), v, global_shape)
    return out


def mesh_from_config(cfg: MeshConfig) -> Mesh:
    """The mesh a run's ``mesh:`` section asks for."""
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor)
