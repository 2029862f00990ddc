"""Shared CLI plumbing: --config/overrides resolution, data files, JSON result lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from clp_jax.config import ConfigModel, load_config
from clp_jax.errors import ClpError

T = TypeVar("T", bound=ConfigModel)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML config file; flags and key=value overrides win over it")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, applied after the YAML file and the flags")


def resolve_config(schema: type[T], args: argparse.Namespace, flags: dict[str, str]) -> T:
    """Config from --config, then the given flags (attribute -> dotted key), then key=value overrides."""
    overrides = [f"{key}={getattr(args, attr)}" for attr, key in flags.items() if getattr(args, attr) is not None]
    return load_config(schema, args.config, overrides + list(args.overrides))


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


def print_result(result: dict[str, Any], stream: Any = None) -> None:
    """The last stdout line of a command: one JSON object."""
    print(json.dumps(result, sort_keys=True), file=stream or sys.stdout, flush=True)


def positive(name: str, value: int) -> int:
    if value < 1:
        raise ClpError(f"{name} must be >= 1, got {value}")
    return value


__all__: Sequence[str] = ["add_config_args", "print_result", "read_lines", "resolve_config"]
