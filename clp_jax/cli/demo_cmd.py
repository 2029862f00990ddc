"""`clp-jax demo`: parse the flags, fetch the inputs not given, and run `clp_jax.demo.run_demo`."""

from __future__ import annotations

import argparse

from clp_jax import demo
from clp_jax.cli.common import add_config_args, print_result
from clp_jax.config import load_config


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", parents=parents, help="CLP-Transfer of SmolLM2-135M to French (or --target-language) on a CPU",
        description="Fetches SmolLM2-135M and Wikipedia summaries in the target language (clp-jax fetch), trains "
                    "a byte-level BPE tokenizer and a small helper GPT-2 on them, compares every transfer strategy "
                    "at step 0 on held-out bits per byte (`study transfer`), continues pretraining the best one and "
                    "the clp, from-scratch and mean baselines for the same steps, runs a short English + target "
                    "math SFT round on the best, and writes report.md, demo.json and plots in --out. A rerun reuses "
                    "each finished stage whose config is unchanged.",
        epilog="Other keys (key=value or in --config): " + ", ".join(demo.DemoConfig.model_fields) + "; see "
               "clp_jax/demo.py for the sections helper, train, sft, eval.")
    p.add_argument("--out", help="output dir (default demo_out)")
    p.add_argument("--target-language", help="target language (default fr; any wiki-LANG of clp-jax fetch --list)")
    p.add_argument("--source", help="source HF model dir (default: clp-jax fetch smollm2-135m)")
    p.add_argument("--text", help="target-language text, one document per line (default: clp-jax fetch wiki-LANG)")
    p.add_argument("--cache", metavar="DIR", help="fetch cache (default $CLP_JAX_CACHE or ~/.cache/clp-jax)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every stage")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    flags = [f"{key}={value}" for key, value in (("out", args.out), ("language", args.target_language),
                                                 ("source", args.source), ("text", args.text)) if value is not None]
    cfg = load_config(demo.DemoConfig, args.config, (demo.QUICK if args.quick else []) + flags + list(args.overrides))
    print_result(demo.run_demo(demo.resolve_inputs(cfg, args.cache)))
    return 0
