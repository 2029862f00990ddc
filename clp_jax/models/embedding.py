"""Embedding lookup that keeps a vocabulary-sharded table sharded (Megatron's vocab-parallel embedding).

``jnp.take`` on a table split over the vocabulary makes XLA gather the whole table on every device, and its
gradient is a whole-table scatter-add in float32 before the reduce-scatter: for BLOOM's 250,880 x 4,096 table
that is 3.8 GiB per buffer, several of them at once. Here each device looks up only the ids that fall in its
rows (zeros elsewhere) for its batch group, and a sum over the vocabulary devices assembles the embeddings; the
backward pass scatters into the local rows only. That moves the batch group's activations instead of the
table, so it is used when they are the smaller (``vocab_parallel``); the train loss makes the same choice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from clp_jax.sharding import logical_to_spec

Array = jax.Array


def _names(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(names: tuple[str, ...]) -> Any:
    return None if not names else names[0] if len(names) == 1 else names


def vocab_mesh_axes(mesh: Any, vocab: int) -> tuple[str, ...]:
    """The mesh axes the rules table splits a ``vocab``-row dimension over (none without a mesh)."""
    return () if mesh.empty else _names(logical_to_spec(("vocab",), (vocab,), mesh)[0])


def vocab_parallel(mesh: Any, vocab_axes: tuple[str, ...], vocab: int, rows: int, positions: int) -> bool:
    """Whether splitting work over the table's rows moves less than gathering the table: true when ``mesh`` splits
    a ``vocab``-row table over ``vocab_axes`` and the [rows, positions] activations of one group of devices that
    share a batch shard (gathered over those axes) hold fewer positions than the table has rows."""
    if mesh.empty or not vocab_axes:
        return False
    batch_axes = _names(logical_to_spec(("batch",), (rows,), mesh)[0])
    apart = 1
    for axis in batch_axes:
        if axis not in vocab_axes:
            apart *= mesh.shape[axis]
    return (rows // apart) * positions <= vocab


def lookup(table: Array, ids: Array, table_axes: tuple[str | None, str | None], dtype: Any) -> Array:
    """``table[ids]`` in ``dtype`` ([B, T] ids -> [B, T, E]); vocab-parallel when a mesh splits the table's rows."""
    mesh = jax.sharding.get_abstract_mesh()
    table_spec = None if mesh.empty else logical_to_spec(table_axes, table.shape, mesh)
    vocab_axes = () if table_spec is None else _names(table_spec[0])
    if not vocab_parallel(mesh, vocab_axes, table.shape[0], *ids.shape):
        return jnp.take(table, ids, axis=0).astype(dtype)
    ids_spec = logical_to_spec(("batch", "length"), ids.shape, mesh)
    batch_axes = _names(ids_spec[0])
    shared = tuple(a for a in batch_axes if a in vocab_axes)  # devices of one vocab group hold different rows
    only_vocab = tuple(a for a in vocab_axes if a not in shared)
    embed_axes = _entry(tuple(a for a in _names(table_spec[1]) if a not in batch_axes))  # the output's split too

    def local(table_part: Array, ids_part: Array) -> Array:
        if shared:
            ids_part = jax.lax.all_gather(ids_part, shared, axis=0, tiled=True)
        n = table_part.shape[0]
        offset = jax.lax.axis_index(vocab_axes) * n
        rel = ids_part - offset
        inside = (rel >= 0) & (rel < n)
        rows = jnp.take(table_part.astype(dtype), jnp.where(inside, rel, 0), axis=0)
        rows = jnp.where(inside[..., None], rows, jnp.zeros((), dtype))
        if only_vocab:
            rows = jax.lax.psum(rows, only_vocab)
        if shared:
            rows = jax.lax.psum_scatter(rows, shared, scatter_dimension=0, tiled=True)
        return rows

    table_spec = PartitionSpec(table_spec[0], embed_axes)
    out_spec = PartitionSpec(ids_spec[0], ids_spec[1], embed_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, ids_spec), out_specs=out_spec)(table, ids)
