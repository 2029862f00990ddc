"""Atomic file writes (readers see the old file or the whole new one, never half of it) and text-file reading."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from clp_jax.errors import ClpError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open a temp file next to ``path`` (parents created); on success fsync it and ``os.replace`` it onto
    ``path``, on any error delete it and leave ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented UTF-8 JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file; a missing, empty or undecodable file is a ClpError."""
    if not os.path.isfile(path):
        raise ClpError(f"{path}: data file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ClpError(f"{path}: line {line} is not valid UTF-8") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ClpError(f"{path}: data file is empty (no non-empty lines)")
    return lines
