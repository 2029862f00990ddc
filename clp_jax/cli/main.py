"""`clp-jax`: one entry point, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from clp_jax import __version__
from clp_jax.errors import ClpError


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

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="clp-jax", parents=[common],
        description="CLP-Transfer and multilingual post-training in JAX: transfer an English-first model to a "
                    "new language, continue pretraining on a device mesh, evaluate and export to Hugging Face.")
    parser.add_argument("--version", action="version", version=f"clp-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (transfer_cmd, train_cmd, sft_cmd, study_cmd, plan_cmd, data_cmd, eval_cmd, generate_cmd,
                   fetch_cmd, convert_cmd, demo_cmd):
        module.register(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
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
