"""Atomic writers: the umask's permissions, leftovers of killed writers removed, one-line errors for bad inputs."""

import os
import signal
import stat
import subprocess
import sys

import pytest

from clp_jax.errors import ClpError
from clp_jax.files import atomic_dir, atomic_open, read_lines, remove_leftovers, temp_prefix

KILLED_WRITER = """
import os, sys, time
from clp_jax.files import atomic_open
from clp_jax.files import atomic_dir

root = sys.argv[1]
writer = atomic_open(os.path.join(root, "notes.txt"))
writer.__enter__().write("half")

def fill(tmp):
    with open(os.path.join(tmp, "part"), "w") as f:
        f.write("half")
    print("ready", flush=True)
    time.sleep(120)

atomic_dir(os.path.join(root, "out"), fill)
"""


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_and_dirs_get_the_umask_permissions(tmp_path, mask):
    from clp_jax.config import ConfigModel, save_config

    class Tiny(ConfigModel):
        x: int = 1

    old = os.umask(mask)
    try:
        with atomic_open(tmp_path / "report.md") as f:
            f.write("# report\n")
        save_config(Tiny(), tmp_path / "config.yaml")
        atomic_dir(str(tmp_path / "model"), lambda tmp: open(os.path.join(tmp, "config.json"), "w").close())
    finally:
        os.umask(old)
    assert mode(tmp_path / "report.md") == mode(tmp_path / "config.yaml") == 0o666 & ~mask
    assert mode(tmp_path / "model") == 0o777 & ~mask
    assert mode(tmp_path / "model" / "config.json") == 0o666 & ~mask


def test_the_next_write_removes_a_killed_writers_leftovers_only(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2 and leftovers[0].startswith(".notes.txt.tmp-") and leftovers[1].startswith(".out.tmp-")
    running = tmp_path / (temp_prefix(tmp_path / "out") + "busy")  # a live writer's temp (this process's)
    running.mkdir()
    other = tmp_path / ".out.tmp-otherhost-1-abc"  # another host's: its process cannot be checked from here
    other.mkdir()
    (tmp_path / ".outer.tmp-x-1-y").mkdir()  # another target's
    with atomic_open(tmp_path / "notes.txt") as f:
        f.write("whole\n")
    atomic_dir(str(tmp_path / "out"), lambda tmp: None)
    assert (tmp_path / "notes.txt").read_text() == "whole\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".outer.tmp-x-1-y", other.name, running.name, "notes.txt", "out"])
    remove_leftovers(tmp_path / "out")
    assert running.exists()


def test_text_and_gguf_readers_say_a_directory_is_a_directory(tmp_path):
    from clp_jax.hf.gguf import open_gguf

    with pytest.raises(ClpError, match=r"is a directory, not a data file$"):
        read_lines(str(tmp_path))
    with pytest.raises(ClpError, match=r"is a directory, not a GGUF file$"):
        open_gguf(str(tmp_path))
    with pytest.raises(ClpError, match=r"none.txt: data file not found$"):
        read_lines(str(tmp_path / "none.txt"))


def test_write_json_writes_on_the_first_process_only(tmp_path, monkeypatch):
    """In a multi-process JAX run only process 0 writes (every process runs the same code)."""
    import sys
    import types

    from clp_jax.files import write_json

    monkeypatch.setitem(sys.modules, "jax", types.SimpleNamespace(process_index=lambda: 1))
    write_json(tmp_path / "a.json", {"x": 1})
    assert not (tmp_path / "a.json").exists()
    monkeypatch.setitem(sys.modules, "jax", types.SimpleNamespace(process_index=lambda: 0))
    write_json(tmp_path / "a.json", {"x": float(2)}, sort_keys=True)
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 2.0\n}\n'
