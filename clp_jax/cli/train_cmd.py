"""`clp-jax train`: continued pretraining on a device mesh from a YAML config; resumes by itself."""

from __future__ import annotations

import argparse

from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.train.config import TrainConfig
from clp_jax.train.loop import Trainer


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train", parents=parents, help="continued pretraining (e.g. after clp-jax transfer) on a device mesh",
        description="Continued pretraining from an HF model dir on a (data, fsdp, tensor) mesh: AdamW with warmup "
                    "and cosine/linear decay, gradient accumulation, Orbax checkpoints (a restart resumes from the "
                    "latest one, SIGTERM saves and exits), per-language held-out loss, metrics.jsonl and "
                    "TensorBoard in the run dir, and an HF export at the end (run_dir/hf/final).")
    add_run_arguments(p)
    p.set_defaults(func=run)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `train` and `sft`: both read a TrainConfig."""
    p.add_argument("--run-dir", help="run dir (config, metrics, checkpoints, exports); reused to resume")
    p.add_argument("--init", help="HF model dir to start from (model.init)")
    p.add_argument("--steps", type=int, help="training steps")
    add_config_args(p)


def run(args: argparse.Namespace, forced: list[str] | None = None) -> int:
    """Resolve the TrainConfig (``forced`` overrides come before the user's) and train."""
    args.overrides = [*(forced or []), *args.overrides]
    cfg = resolve_config(TrainConfig, args, {"run_dir": "run_dir", "init": "model.init", "steps": "steps"})
    print_result(Trainer(cfg).run())
    return 0
