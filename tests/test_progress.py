"""clp_jax.progress.bar: tqdm's updates on a terminal, a few lines per bar in a log."""

import io
import itertools
import re

import pytest

from clp_jax import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def updates(stream: io.StringIO) -> list[str]:
    """The states a bar wrote: tqdm separates them with carriage returns, and ends a kept bar with a newline."""
    return [s for s in re.split(r"[\r\n]", stream.getvalue()) if s.strip()]


@pytest.fixture
def slow_clock(monkeypatch):
    """tqdm's clock advancing 0.1 s per reading, so 1000 updates span minutes; no monitor thread."""
    clock = itertools.count(0.0, 0.1)
    monkeypatch.setattr("tqdm.std.time", lambda: next(clock))
    monkeypatch.setattr("tqdm.std.tqdm.monitor_interval", 0)


@pytest.mark.parametrize("leave", [True, False])
def test_a_bar_in_a_log_writes_a_few_lines_and_its_last_state(slow_clock, leave):
    log = io.StringIO()
    for _ in progress.bar(range(1000), desc="load", unit="tensor", file=log, leave=leave):
        pass
    lines = updates(log)
    assert 2 <= len(lines) <= 6, lines
    assert lines[0].startswith("load:   0%") and lines[-1].startswith("load: 100%") and "1000/1000" in lines[-1]
    assert log.getvalue().endswith("\n")


def test_a_bar_on_a_terminal_keeps_tqdm_updates(slow_clock):
    terminal = Terminal()
    for _ in progress.bar(range(1000), desc="load", unit="tensor", file=terminal, leave=False):
        pass
    assert len(updates(terminal)) > 100


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    with progress.bar(total=10, desc="load", unit="tensor", file=log, disable=True) as b:
        b.update(10)
    assert log.getvalue() == ""
