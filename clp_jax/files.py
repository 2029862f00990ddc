"""Atomic file writes (readers see the old file or the whole new one, never half of it) and text-file reading."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from clp_jax.errors import ClpError


def umask() -> int:
    """The process umask: from /proc/self/status where Linux has it, else set to 0 and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions ``open`` or ``mkdir`` would give a new file or dir: 0o666 or 0o777 less the umask
    (tempfile's mkstemp and mkdtemp give 0o600 and 0o700)."""
    return (0o777 if directory else 0o666) & ~umask()


def _host() -> str:
    return platform.node() or "host"


def _temp_base(path: str | os.PathLike) -> str:
    return f".{os.path.basename(os.path.abspath(path))}.tmp-"


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of this process's hidden temp files and dirs next to ``path``: ``.NAME.tmp-HOST-PID-``."""
    return f"{_temp_base(path)}{_host()}-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_leftovers(path: str | os.PathLike) -> None:
    """Delete the temp files and dirs that killed writers of ``path`` left next to it: only siblings named
    ``.NAME.tmp-HOST-PID-*`` of this host whose process is gone (a running writer's and other hosts' stay)."""
    parent, base = os.path.dirname(os.path.abspath(path)), _temp_base(path)
    try:
        names = [n for n in os.listdir(parent) if n.startswith(base)]
    except OSError:
        return
    for name in names:
        parts = name[len(base):].rsplit("-", 2)  # HOST, PID, mkstemp's random letters
        if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit() or _running(int(parts[1])):
            continue
        leftover = os.path.join(parent, name)
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(leftover)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open a temp file ``.NAME.tmp-HOST-PID-*`` next to ``path`` (parents created, killed writers' leftovers
    removed first: ``remove_leftovers``); on success give it the umask's permissions, fsync it and ``os.replace``
    it onto ``path``, on any error delete it and leave ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            os.fchmod(f.fileno(), default_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _primary_process() -> bool:
    """False on every JAX process but the first of a multi-process run (JAX untouched when not imported)."""
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> None:
    """``data`` as indented UTF-8 JSON ending in a newline, atomically, by the first process only (the package's
    one JSON writer)."""
    if not _primary_process():
        return
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=sort_keys)
        f.write("\n")


def require_file(path: str | os.PathLike, what: str = "data file") -> None:
    """A ClpError unless ``path`` is a file: it says whether it is a directory or missing."""
    if os.path.isdir(path):
        raise ClpError(f"{path}: is a directory, not a {what}")
    if not os.path.isfile(path):
        raise ClpError(f"{path}: {what} not found")


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file; a missing, unreadable, empty or undecodable file is a ClpError."""
    require_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ClpError(f"{path}: cannot read data file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ClpError(f"{path}: line {line} is not valid UTF-8") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ClpError(f"{path}: data file is empty (no non-empty lines)")
    return lines


def _write_error(out_dir: str, e: OSError, tmp: str | None = None) -> str:
    """One line for an OSError while writing ``out_dir``; a file in the temp dir is named by its final path."""
    name = os.path.abspath(str(e.filename)) if e.filename else ""
    if tmp and (name + os.sep).startswith(tmp + os.sep):
        name = out_dir + name[len(tmp):]
    where = f" ({name})" if name and name != out_dir else ""
    return f"{out_dir}: cannot write the output: {e.strerror or e}{where}; nothing was written"


def check_writable(out_dir: str, need_bytes: int = 0) -> None:
    """A ClpError unless a temp dir can be made next to ``out_dir`` (its parent is created) and that filesystem
    has ``need_bytes`` free: checked before a long computation whose result goes there."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=temp_prefix(out_dir), dir=parent))
        free = shutil.disk_usage(parent).free
    except OSError as e:
        raise ClpError(_write_error(out_dir, e)) from e
    if free < need_bytes:
        from clp_jax.memory import format_bytes

        raise ClpError(f"{out_dir}: the output needs about {format_bytes(need_bytes)} but {parent} has only "
                       f"{format_bytes(free)} free")


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing an existing ``out_dir``."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(old, "x"))
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def atomic_dir(out_dir: str, fill: Callable[[str], None], overwrite: bool = False) -> None:
    """Run ``fill(tmp_dir)`` in a temp dir ``.OUT.tmp-HOST-PID-*`` next to ``out_dir``, give it the umask's
    permissions and rename it to ``out_dir``. Killed writers' leftover temp dirs of ``out_dir`` are removed first
    (``remove_leftovers``); an OSError becomes a ClpError naming ``out_dir``; on any failure nothing is left."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ClpError(f"{out_dir}: output directory exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_leftovers(out_dir)
        tmp = tempfile.mkdtemp(prefix=temp_prefix(out_dir), dir=parent)
    except OSError as e:
        raise ClpError(_write_error(out_dir, e)) from e
    try:
        os.chmod(tmp, default_mode(directory=True))
        fill(tmp)
        _move_into_place(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ClpError(_write_error(out_dir, e, tmp)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
