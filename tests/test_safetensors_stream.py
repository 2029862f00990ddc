"""The streaming safetensors writer: files safetensors itself reads back exactly, shards, header overflow, memory."""

import gc
import json
import os
import struct
import weakref

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from clp_jax.hf.safetensors_stream import ShardWriter, write_shards


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    return [("a.weight", rng.standard_normal((5, 7)).astype(np.float32)),
            ("b.bias", rng.standard_normal(3).astype(ml_dtypes.bfloat16)),
            ("c.half", rng.standard_normal((2, 2, 3)).astype(np.float16)),
            ("d.ids", rng.integers(0, 1000, (4,), dtype=np.int64)),
            ("e.scalar", np.asarray(1.5, np.float32)),
            ("f.transposed", rng.standard_normal((6, 4)).astype(np.float32).T)]


def test_one_shard_reads_back_exactly_with_metadata(tmp_path):
    shards, where, total = write_shards(str(tmp_path), iter(tensors()), 6, max_shard_bytes=1 << 30)
    assert len(shards) == 1 and set(where.values()) == {"0"}
    assert total == sum(a.nbytes for _, a in tensors())
    back = load_file(shards[0])
    for name, a in tensors():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        np.testing.assert_array_equal(back[name], a)
    with safe_open(shards[0], "np") as f:
        assert f.metadata() == {"format": "pt"}
    with open(shards[0], "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        assert n % 8 == 0 and json.loads(f.read(n))["a.weight"]["data_offsets"][0] == 0


def test_shards_split_at_the_byte_limit_and_keep_every_tensor(tmp_path):
    shards, where, total = write_shards(str(tmp_path), iter(tensors()), 6, max_shard_bytes=100)
    assert len(shards) > 2
    for name, a in tensors():
        np.testing.assert_array_equal(load_file(shards[int(where[name])])[name], a)
    assert sum(os.path.getsize(s) for s in shards) > total


def test_header_larger_than_its_room_is_rewritten_once(tmp_path):
    path = str(tmp_path / "x.safetensors")
    writer = ShardWriter(path, expected_tensors=1)
    long = [("n" * 3000 + str(i), np.full((2,), i, np.float32)) for i in range(3)]
    for name, a in long:
        writer.add(name, a)
    writer.close()
    back = load_file(path)
    assert sorted(back) == sorted(n for n, _ in long) and not os.path.exists(path + ".rewrite")
    for name, a in long:
        np.testing.assert_array_equal(back[name], a)


def test_no_tensor_is_held_after_it_is_written(tmp_path):
    alive = []

    def produce():
        for i in range(4):
            a = np.full((256, 256), i, np.float32)
            alive.append(weakref.ref(a))
            yield f"t{i}", a
            del a
            gc.collect()
            assert all(r() is None for r in alive[:-1]), "an earlier tensor is still referenced"

    shards, _, _ = write_shards(str(tmp_path), produce(), 4, max_shard_bytes=1 << 30)
    assert [float(load_file(shards[0])[f"t{i}"][0, 0]) for i in range(4)] == [0, 1, 2, 3]


def test_bad_input_is_refused(tmp_path):
    writer = ShardWriter(str(tmp_path / "x"), 2)
    writer.add("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="no safetensors type"):
        writer.add("b", np.zeros(2, np.complex64))
    writer.abort()
