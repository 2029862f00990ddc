"""The train state (step, master weights, optimizer state) and its shardings from the logical-axis rules.

Parameters are kept in ``cfg.param_dtype`` (float32 master weights unless a run asks otherwise); the model
casts them to ``cfg.dtype`` for compute. Every optimizer leaf shaped like a parameter (Adam's moments) is
found by its path ending in that parameter's path and gets the parameter's sharding; scalars (counts, the
learning rate) and anything else are replicated.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clp_jax import models
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import named_sharding


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a plain pytree (checkpointed as is)."""

    step: jax.Array  # int32 scalar: train steps taken, skipped ones included
    params: Any
    opt_state: Any


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A step-0 state for ``params`` (kept in their dtype) with fresh optimizer state."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def _keys(path: tuple) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def _param_suffix(path: tuple, by_path: dict[tuple, tuple]) -> tuple | None:
    """The parameter path that ``path`` ends with (the longest match), if any."""
    keys = _keys(path)
    for start in range(len(keys)):
        if keys[start:] in by_path:
            return keys[start:]
    return None


def state_shardings(cfg: TransformerConfig, mesh: Mesh, optimizer: optax.GradientTransformation) -> TrainState:
    """NamedShardings for every leaf of the state ``init_state`` builds for ``cfg``'s parameters."""
    shapes = models.param_shapes(cfg)
    axes = models.param_axes(cfg)
    flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    by_path = {_keys(p): a for p, a in flat_axes}
    shape_of = {_keys(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf_sharding(path: tuple, leaf: Any) -> NamedSharding:
        match = _param_suffix(path, by_path)
        if match is None or shape_of[match] != tuple(leaf.shape):
            return replicated
        return named_sharding(by_path[match], leaf.shape, mesh)

    abstract = jax.eval_shape(lambda p: init_state(p, optimizer), shapes)
    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract)


def abstract_state(cfg: TransformerConfig, mesh: Mesh, optimizer: optax.GradientTransformation) -> TrainState:
    """``jax.ShapeDtypeStruct`` with sharding for every state leaf: the restore target for a checkpoint."""
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer), models.param_shapes(cfg))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_shardings(cfg, mesh, optimizer))


def create_sharded_state(params: Any, cfg: TransformerConfig, optimizer: optax.GradientTransformation,
                         mesh: Mesh) -> TrainState:
    """A step-0 state on ``mesh``: ``params`` (host or device arrays) cast to ``cfg.param_dtype`` and sharded."""
    shardings = state_shardings(cfg, mesh, optimizer)
    params = jax.device_put(params, shardings.params)

    def build(p: Any) -> TrainState:
        return init_state(jax.tree.map(lambda x: x.astype(cfg.weight_dtype), p), optimizer)

    return jax.jit(build, out_shardings=shardings)(params)
