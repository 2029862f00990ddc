"""The vocab-parallel embedding lookup: equal to ``table[ids]`` and its scatter-add gradient (numpy), on meshes
that split the vocabulary, the embedding dim, both or neither; and no whole-table buffer on a device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from clp_jax.models.embedding import lookup
from clp_jax.sharding import logical_to_spec, make_mesh

AXES = ("vocab", "embed")


def _placed(mesh, table, ids):
    t = jax.device_put(table, NamedSharding(mesh, logical_to_spec(AXES, table.shape, mesh)))
    i = jax.device_put(ids, NamedSharding(mesh, logical_to_spec(("batch", "length"), ids.shape, mesh)))
    return t, i


def _loss(mesh, take):
    def f(table, ids, ct):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            rows = jnp.take(table, ids, axis=0) if take else lookup(table, ids, AXES, jnp.float32)
        return jnp.sum(rows * ct)
    return jax.jit(jax.value_and_grad(f))


# vocab 66: split by 2 (tensor) but not by 4 or 8, so (1, 4, 2) splits the table's rows and columns.
@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (8, 1, 1)])
@pytest.mark.parametrize("vocab", [64, 66])
def test_lookup_equals_take_and_its_gradient(shape, vocab):
    mesh = make_mesh(*shape, devices=jax.devices())
    rng = np.random.default_rng(0)
    table = rng.normal(size=(vocab, 16)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(8, 5)).astype(np.int32)
    ct = rng.normal(size=(8, 5, 16)).astype(np.float32)
    value, grad = _loss(mesh, take=False)(*_placed(mesh, table, ids), ct)
    expected_grad = np.zeros((vocab, 16))
    np.add.at(expected_grad, ids, ct.astype(np.float64))
    np.testing.assert_allclose(float(value), float((table[ids].astype(np.float64) * ct).sum()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-6)


def test_lookup_never_holds_the_whole_table():
    """``jnp.take`` on a row-split table needs a whole-table temporary per device; the lookup does not."""
    mesh = make_mesh(1, 8, 1, devices=jax.devices())
    table = np.zeros((8192, 64), np.float32)  # 2 MiB; the batch's rows are 64 KiB
    ids = np.zeros((8, 32), np.int32)
    ct = np.ones((8, 32, 64), np.float32)
    args = (*_placed(mesh, table, ids), ct)
    temp = {take: _loss(mesh, take).lower(*args).compile().memory_analysis().temp_size_in_bytes
            for take in (True, False)}
    assert temp[True] >= table.nbytes
    assert temp[False] < table.nbytes / 4


def test_vocab_parallel_when_a_batch_group_is_smaller_than_the_table():
    """Split the work over the table's rows only when one batch group's positions are fewer than its rows."""
    from clp_jax.models.embedding import vocab_mesh_axes, vocab_parallel

    def parallel(mesh, vocab, rows, positions):
        return vocab_parallel(mesh, vocab_mesh_axes(mesh, vocab), vocab, rows, positions)

    split = make_mesh(2, 4, 1, devices=jax.devices()).abstract_mesh  # batch over data x fsdp, vocab over fsdp
    assert vocab_mesh_axes(split, 64) == ("fsdp",) and vocab_mesh_axes(split, 66) == ()
    assert parallel(split, 64, rows=8, positions=16)  # a group: 8 / 2 rows x 16 = 64 positions
    assert not parallel(split, 64, rows=8, positions=17)
    assert not parallel(split, 66, rows=8, positions=1)  # 66 rows do not split over fsdp
    assert not parallel(make_mesh(8, 1, 1, devices=jax.devices()).abstract_mesh, 64, rows=8, positions=1)
    assert not parallel(jax.sharding.AbstractMesh((), ()), 64, rows=8, positions=1)
