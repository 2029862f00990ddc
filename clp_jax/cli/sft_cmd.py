"""`clp-jax sft`: supervised fine-tuning (loss on responses only) with the same trainer as `clp-jax train`."""

from __future__ import annotations

import argparse

from clp_jax.cli.common import add_run_arguments, run_trainer


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sft", parents=parents, help="instruction tuning on prompt/response data (single- or multi-task mixtures)",
        description="Supervised fine-tuning: the config of `clp-jax train` with data.mode=sft. Sources are JSONL "
                    "files with inputs/targets/language fields (Aya format) and a task name; examples are "
                    "formatted with the tokenizer's chat template when it has one, and the loss covers response "
                    "tokens only. Several sources (tasks, languages) are mixed by data.mixture, e.g. "
                    "kind=english_plus_n for a fixed English budget plus N examples per language (english and "
                    "languages name language codes or source names). Example: configs/sft_example.yaml.")
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_trainer(args, forced=["data.mode=sft"])
