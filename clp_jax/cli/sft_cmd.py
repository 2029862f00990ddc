"""`clp-jax sft`: supervised fine-tuning (loss on responses only) with the same trainer as `clp-jax train`."""

from __future__ import annotations

import argparse

from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.train.config import TrainConfig
from clp_jax.train.loop import Trainer


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sft", parents=parents, help="instruction tuning on prompt/response data (single- or multi-task mixtures)",
        description="Supervised fine-tuning: the config of `clp-jax train` with data.mode=sft. Sources are JSONL "
                    "files with inputs/targets/language fields (Aya format) and a task name; examples are "
                    "formatted with the tokenizer's chat template when it has one, and the loss covers response "
                    "tokens only. Several sources (tasks, languages) are mixed by data.mixture, e.g. "
                    "kind=english_plus_n for a fixed English budget plus N examples per language.")
    p.add_argument("--run-dir", help="run dir (config, metrics, checkpoints, exports); reused to resume")
    p.add_argument("--init", help="HF model dir to fine-tune (model.init)")
    p.add_argument("--steps", type=int, help="training steps")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.overrides = ["data.mode=sft", *args.overrides]
    cfg = resolve_config(TrainConfig, args, {"run_dir": "run_dir", "init": "model.init", "steps": "steps"})
    print_result(Trainer(cfg).run())
    return 0
