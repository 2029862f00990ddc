"""`clp-jax lm-eval`: EleutherAI's lm-evaluation-harness CLI with the `clp-jax` model registered."""

from __future__ import annotations

import argparse

from clp_jax.errors import ClpError


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lm-eval", prefix_chars="+", add_help=False,  # no options of its own: every argument is lm-eval's
        help="benchmarks through lm-evaluation-harness with an HF model dir (model name clp-jax)",
        description="Runs lm-eval's own CLI (`lm-eval ARGS`) with the model name clp-jax registered, and "
                    "`--model clp-jax` unless --model is given: e.g. clp-jax lm-eval --model_args "
                    "pretrained=DIR,batch_size=16 --tasks belebele_fra_Latn. Every argument goes to lm-eval; "
                    "`clp-jax lm-eval --help` prints lm-eval's help. Needs pip install 'clp-jax[lm-eval]'.")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval arguments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from clp_jax.eval import harness
    except ImportError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        raise ClpError("lm-evaluation-harness is not installed; pip install 'clp-jax[lm-eval]'") from e
    harness.main(args.lm_eval_args or ["--help"])
    return 0
