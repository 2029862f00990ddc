"""Every benchmark and check script under scripts/ still imports and explains itself (`--help`)."""

import pathlib
import subprocess
import sys

import pytest

SCRIPTS = sorted(p.name for p in (pathlib.Path(__file__).parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_runs(script):
    path = pathlib.Path(__file__).parents[1] / "scripts" / script
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
