"""`clp-jax data`: read, tokenize (cached) and mix a run's data; print and save the resolved mixture."""

from __future__ import annotations

import argparse
import os
import sys

import pydantic

from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.config import ConfigModel, save_config
from clp_jax.data.pipeline import DataConfig, build_data
from clp_jax.files import write_json
from clp_jax.hf.tokenizer import load_tokenizer


class DataRunConfig(ConfigModel):
    """What `clp-jax data` reads: the `data:` section of a training config plus a tokenizer."""

    tokenizer: str
    data: DataConfig
    steps: int | None = pydantic.Field(None, ge=1)
    out: str | None = None


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "data", parents=parents, help="preview a run's data: sources, tokens, mixture shares and epochs",
        description="Read every source of a config's `data:` section, tokenize it (cached on disk when "
                    "data.cache_dir is set), resolve the mixture and print per source: documents, skipped lines, "
                    "tokens, share and expected epochs (for --steps). With --out, writes data_report.json and the "
                    "resolved config.yaml.")
    p.add_argument("--tokenizer", help="tokenizer dir (e.g. the model dir to be trained)")
    p.add_argument("--steps", type=int, help="training steps, for expected epochs per source")
    p.add_argument("--out", help="dir for data_report.json and config.yaml")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clp_jax.files import atomic_dir

    cfg = resolve_config(DataRunConfig, args, {"tokenizer": "tokenizer", "steps": "steps", "out": "out"})
    tokenizer = load_tokenizer(cfg.tokenizer)
    data = build_data(cfg.data, tokenizer, steps=cfg.steps)
    print(data.format_report(), file=sys.stderr)
    report = data.report()
    if cfg.out:
        def fill(tmp: str) -> None:
            save_config(cfg, os.path.join(tmp, "config.yaml"))
            write_json(os.path.join(tmp, "data_report.json"), report)

        atomic_dir(cfg.out, fill, overwrite=True)
    total = sum(s["tokens"] for s in report["sources"])
    print_result({"sources": len(report["sources"]), "tokens": total,
                  "shares": {s["name"]: s["share"] for s in report["sources"]}})
    return 0

