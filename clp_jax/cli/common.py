"""Shared CLI plumbing: --config/overrides resolution, data files, JSON result lines."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from clp_jax.config import ConfigModel, load_config
from clp_jax.errors import ClpError
from clp_jax.files import read_lines

T = TypeVar("T", bound=ConfigModel)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML config file; flags and key=value overrides win over it")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, applied after the YAML file and the flags")


def resolve_config(schema: type[T], args: argparse.Namespace, flags: dict[str, str]) -> T:
    """Config from --config, then the given flags (attribute -> dotted key), then key=value overrides."""
    overrides = [f"{key}={getattr(args, attr)}" for attr, key in flags.items() if getattr(args, attr) is not None]
    return load_config(schema, args.config, overrides + list(args.overrides))


def print_result(result: dict[str, Any], stream: Any = None) -> None:
    """The last stdout line of a command: one JSON object."""
    print(json.dumps(result, sort_keys=True), file=stream or sys.stdout, flush=True)


def positive(name: str, value: int) -> int:
    if value < 1:
        raise ClpError(f"{name} must be >= 1, got {value}")
    return value


__all__: Sequence[str] = ["add_config_args", "print_result", "read_lines", "resolve_config"]
