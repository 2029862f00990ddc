"""`clp-jax train`: continued pretraining on a device mesh from a YAML config; resumes by itself."""

from __future__ import annotations

import argparse

from clp_jax.cli.common import add_run_arguments, run_trainer


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train", parents=parents, help="continued pretraining (e.g. after clp-jax transfer) on a device mesh",
        description="Continued pretraining from an HF model dir on a (data, fsdp, tensor) mesh: AdamW with warmup "
                    "and cosine/linear decay, gradient accumulation, Orbax checkpoints (a restart resumes from the "
                    "latest one; SIGTERM saves and exits with code 75), per-language held-out loss, metrics.jsonl and "
                    "TensorBoard in the run dir, and an HF export at the end (run_dir/hf/final).")
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_trainer(args)
