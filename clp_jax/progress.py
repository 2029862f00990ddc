"""Progress bars on stderr: tqdm's on a terminal or in a notebook, a few lines per bar in a log file or pipe."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import std
from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as console_or_notebook

LOG_INTERVAL_S = 30.0  # at most one update of a bar per this many seconds in a log


def _is_log(stream: IO[str]) -> bool:
    """Whether ``stream`` is a file or pipe, not a terminal or a notebook's widget."""
    try:
        return console_or_notebook is std.tqdm and not stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return True


def bar(iterable: Iterable[Any] | None = None, *, desc: str, unit: str, total: float | None = None,
        disable: bool = False, file: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on ``file`` (stderr); in a log: an update per 30 s at most, fixed width, its last state kept."""
    file = file or sys.stderr
    if _is_log(file):
        kwargs.update(mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, dynamic_ncols=False, leave=True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file, **kwargs)


def write(message: str) -> None:
    """Print ``message`` as a line on stderr without breaking a bar drawn there."""
    tqdm.write(message, file=sys.stderr)
