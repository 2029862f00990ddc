"""Write safetensors files tensor by tensor, so host memory stays near the largest single tensor.

A safetensors file is an 8-byte header length, a JSON header (names, dtypes, shapes, data offsets) and the
tensor bytes. The header comes first but is only known at the end, so each shard reserves room for it,
streams tensor bytes after that room as they arrive, and writes the header, padded with spaces (which the
format allows), into the room when the shard closes. If the names outgrow the room, the shard is rewritten
once behind a larger header, copied in chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from typing import IO, Any

import ml_dtypes
import numpy as np

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
           np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
           np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
_HEADER_BYTES_PER_TENSOR = 320
_COPY_CHUNK = 64 << 20


def _header(entries: dict[str, dict[str, Any]], metadata: dict[str, str]) -> bytes:
    return json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")


class ShardWriter:
    """One safetensors file being written: ``add`` streams a tensor's bytes, ``close`` writes the header."""

    def __init__(self, path: str, expected_tensors: int, metadata: dict[str, str] | None = None):
        self.path = path
        self.metadata = metadata or {}
        self.reserved = -(-(1024 + _HEADER_BYTES_PER_TENSOR * max(expected_tensors, 1)) // 8) * 8
        self.entries: dict[str, dict[str, Any]] = {}
        self.offset = 0
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.seek(8 + self.reserved)

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self.entries:
            raise ValueError(f"tensor {name!r} written twice")
        if array.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors type")
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        self._file.write(memoryview(array.reshape(-1).view(np.uint8)))
        self.entries[name] = {"dtype": _DTYPES[array.dtype], "shape": list(array.shape),
                              "data_offsets": [self.offset, self.offset + array.nbytes]}
        self.offset += array.nbytes

    def close(self) -> None:
        header = _header(self.entries, self.metadata)
        if len(header) <= self.reserved:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self.reserved) + header + b" " * (self.reserved - len(header)))
            self._file.close()
            return
        self._file.close()
        self._rewrite(header)

    def abort(self) -> None:
        self._file.close()

    def _rewrite(self, header: bytes) -> None:
        """The header outgrew its room: copy the data behind an exactly sized header."""
        size = -(-len(header) // 8) * 8
        tmp = self.path + ".rewrite"
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", size) + header + b" " * (size - len(header)))
            src.seek(8 + self.reserved)
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        os.replace(tmp, self.path)


def write_shards(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]], n_tensors: int,
                 max_shard_bytes: int) -> tuple[list[str], dict[str, str], int]:
    """Stream (name, array) pairs into ``shard-NNNNN.tmp`` files under ``out_dir``, a new shard past
    ``max_shard_bytes``; returns (shard paths, name -> shard index as str, total bytes)."""
    shards: list[str] = []
    where: dict[str, str] = {}
    total = written = 0
    shard: ShardWriter | None = None
    try:
        for name, array in tensors:
            if shard is not None and shard.offset and shard.offset + array.nbytes > max_shard_bytes:
                shard.close()
                shard = None
            if shard is None:
                shards.append(os.path.join(out_dir, f"shard-{len(shards):05d}.tmp"))
                shard = ShardWriter(shards[-1], n_tensors - written, {"format": "pt"})
            shard.add(name, array)
            where[name] = str(len(shards) - 1)
            total += array.nbytes
            written += 1
        if shard is None:
            shards.append(os.path.join(out_dir, "shard-00000.tmp"))
            shard = ShardWriter(shards[-1], 0, {"format": "pt"})
        shard.close()
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    return shards, where, total
