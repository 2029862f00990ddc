"""`clp-jax`: one entry point, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from clp_jax import __version__
from clp_jax.errors import ClpError, ClpWarning

_FORMAT_WARNING = warnings.formatwarning


def build_parser() -> argparse.ArgumentParser:
    from clp_jax.cli import (
        convert_cmd,
        data_cmd,
        demo_cmd,
        eval_cmd,
        fetch_cmd,
        generate_cmd,
        plan_cmd,
        sft_cmd,
        study_cmd,
        train_cmd,
        transfer_cmd,
    )

    parser = argparse.ArgumentParser(
        prog="clp-jax",
        description="CLP-Transfer and multilingual post-training in JAX: transfer an English-first model to a "
                    "new language, continue pretraining on a device mesh, evaluate and export to Hugging Face.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    # A subcommand's --debug sets the flag only when given, so `clp-jax --debug CMD` is not overridden by its default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"clp-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (transfer_cmd, train_cmd, sft_cmd, study_cmd, plan_cmd, data_cmd, eval_cmd, generate_cmd,
                   fetch_cmd, convert_cmd, demo_cmd):
        module.register(sub, [common])
    return parser


def show_clp_warnings(command: str) -> None:
    """Print each ClpWarning once, as one line ``clp-jax COMMAND: warning: ...``; other warnings as Python does."""
    def format_warning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, ClpWarning):
            return f"clp-jax {command}: warning: {message}\n"
        return _FORMAT_WARNING(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    warnings.simplefilter("once", ClpWarning)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # e.g. "PyTorch was not found", read at import
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    show_clp_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except ClpError as e:
        if args.debug:
            raise
        print(f"clp-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clp-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
