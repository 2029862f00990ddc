"""`clp-jax`: one entry point, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from clp_jax import __version__
from clp_jax.errors import EXIT_PREEMPTED, ClpError, ClpWarning, Preempted

_FORMAT_WARNING = warnings.formatwarning
# The commands and their help lines, in `clp-jax --help` order. Only the command being run imports its module,
# clp_jax.cli.NAME_cmd, which may import jax and transformers; each module's own help line must match.
COMMANDS = {
    "transfer": "CLP-Transfer: build a target-language model from a source + helper",
    "train": "continued pretraining (e.g. after clp-jax transfer) on a device mesh",
    "sft": "instruction tuning on prompt/response data (single- or multi-task mixtures)",
    "study": "experiment grids (clt: cross-lingual transfer in SFT; transfer: embedding strategies)",
    "plan": "compile a train config for a TPU topology ahead of time: per-chip HBM, fit, FLOPs and tokens/s",
    "data": "preview a run's data: sources, tokens, mixture shares and epochs",
    "eval": "perplexity of an HF model dir on a text file",
    "lm-eval": "benchmarks through lm-evaluation-harness with an HF model dir (model name clp-jax)",
    "generate": "complete text prompts with an HF model dir (greedy or sampled)",
    "fetch": "download a model (as an HF dir) or a text corpus into the local cache",
    "convert": "convert a GGUF checkpoint into an HF model dir",
    "demo": "CLP-Transfer of SmolLM2-135M to French (or --target-language) on a CPU",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `clp-jax` parser with ``command``'s arguments; every other command by its name and help line only."""
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
    for name, help_line in COMMANDS.items():
        if name == command:
            importlib.import_module(f"clp_jax.cli.{name.replace('-', '_')}_cmd").register(sub, [common])
        else:
            sub.add_parser(name, help=help_line)
    return parser


def command_named(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs: its first word that is not an option (the top-level options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def keep_jax_off_libtpu(command: str) -> None:
    """On a host with libtpu but no TPU, run JAX on the CPU: libtpu's failed start logs errors (plan sets its own)."""
    if command == "plan" or os.environ.get("JAX_PLATFORMS") or _jax_plugins_installed():
        return
    from clp_jax.chips import host_has_tpu, libtpu_installed

    if libtpu_installed() and not host_has_tpu():
        os.environ["JAX_PLATFORMS"] = "cpu"  # read when jax is first imported, so most commands never import it here
        if "jax" in sys.modules:  # a command module that imported jax already
            sys.modules["jax"].config.update("jax_platforms", "cpu")


# Commands whose time goes into train steps; on a CPU they keep freed memory for the next step (clp_jax.host_memory).
TRAINING_COMMANDS = ("train", "sft", "study", "demo")


def runs_on_cpu() -> bool:
    """Whether JAX will pick its CPU backend, decided before it starts: JAX_PLATFORMS, else no plugin and no TPU."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    from clp_jax.chips import host_has_tpu

    return not _jax_plugins_installed() and not host_has_tpu()


def _jax_plugins_installed() -> bool:
    """Whether a PJRT plugin (CUDA, ROCm, ...) is installed, whose platform jax should keep choosing."""
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    return find_spec("jax_plugins") is not None or bool(entry_points(group="jax_plugins"))


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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_named(argv)).parse_args(argv)
    keep_jax_off_libtpu(args.command)
    if args.command in TRAINING_COMMANDS and runs_on_cpu():
        from clp_jax.host_memory import keep_freed_memory

        keep_freed_memory()
    show_clp_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except Preempted as e:
        if args.debug:
            raise
        print(f"clp-jax {args.command}: preempted: {e} (exit {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
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
