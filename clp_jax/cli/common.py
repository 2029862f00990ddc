"""Shared CLI plumbing: --config/overrides resolution, data files, JSON result lines, the Trainer runs of
`train` and `sft`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from clp_jax.config import ConfigModel, load_config
from clp_jax.errors import EXIT_PREEMPTED, ClpError
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


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `train` and `sft`: both read a TrainConfig."""
    p.add_argument("--run-dir", help="run dir (config, metrics, checkpoints, exports); reused to resume")
    p.add_argument("--init", help="HF model dir to start from (model.init)")
    p.add_argument("--steps", type=int, help="training steps")
    add_config_args(p)


def run_trainer(args: argparse.Namespace, forced: Sequence[str] = ()) -> int:
    """Resolve the TrainConfig (``forced`` overrides come before the user's) and train; 75 when preempted."""
    from clp_jax.train.config import TrainConfig
    from clp_jax.train.loop import Trainer

    args.overrides = [*forced, *args.overrides]
    cfg = resolve_config(TrainConfig, args, {"run_dir": "run_dir", "init": "model.init", "steps": "steps"})
    return finish_run(Trainer(cfg).run(), getattr(args, "command", "train"))


def finish_run(summary: dict[str, Any], command: str) -> int:
    """Print the run's summary line and return the exit code: 0, or 75 after a preemption (saying how to resume)."""
    print_result(summary)
    if summary["status"] != "preempted":
        return 0
    print(f"clp-jax {command}: preempted: saved step {summary['step']} in "
          f"{os.path.join(summary['run_dir'], 'checkpoints')}; rerun the same command to resume from it "
          f"(exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


def positive(name: str, value: int) -> int:
    if value < 1:
        raise ClpError(f"{name} must be >= 1, got {value}")
    return value


def comma_names(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated, non-empty list of names from ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            what = ",".join(bad) if bad else repr(text)
            raise argparse.ArgumentTypeError(f"{what}: expected names from {', '.join(allowed)}")
        return names
    return parse


__all__: Sequence[str] = ["add_config_args", "add_run_arguments", "comma_names", "finish_run", "print_result",
                           "read_lines", "resolve_config", "run_trainer"]

