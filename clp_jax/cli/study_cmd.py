"""`clp-jax study clt`: read the config and run `clp_jax.posttrain.study_run.run_clt_study`; `clp-jax study
transfer`: parse the flags and run `clp_jax.transfer.study.run_study`."""

from __future__ import annotations

import argparse
import os

from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.compile_cache import use_compilation_cache
from clp_jax.posttrain.study import StudyConfig
from clp_jax.posttrain.study_run import run_clt_study
from clp_jax.transfer import study as transfer_study


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("study", parents=parents,
                       help="experiment grids (clt: cross-lingual transfer in SFT; transfer: embedding strategies)",
                       description="Experiment grids. `clp-jax study clt --config FILE` runs a cross-lingual "
                                   "transfer study: a fixed English budget plus N examples per seen language, "
                                   "single- or multi-task, one or more models; each cell is an SFT run evaluated "
                                   "on English, seen and unseen languages. A finished cell is reused on rerun while "
                                   "its config is unchanged; a changed one is named and redone. "
                                   "`clp-jax study transfer` compares embedding transfer strategies on held-out "
                                   "bits per byte, at step 0 and during continued pretraining.")
    kinds = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    clt = kinds.add_parser("clt", parents=parents, help="cross-lingual transfer grid",
                           description="Writes run_dir/results.csv, results.json and PNG plots: metric vs N per "
                                       "language, seen-vs-unseen gap, train x eval language transfer matrix. "
                                       "Compiled programs are cached in run_dir/xla_cache, so cells after the "
                                       "first (and reruns) skip most compiles.")
    add_config_args(clt)
    clt.set_defaults(func=run)
    tr = kinds.add_parser(
        "transfer", parents=parents, help="compare embedding transfer strategies on held-out bits per byte",
        description="Transfers --source with each strategy (for --helper's tokenizer), evaluates held-out loss and "
                    "bits per byte at step 0 (and the source with its own tokenizer and the helper as reference "
                    "lines), optionally continues pretraining each for --steps steps on the same data in the same "
                    "order, evaluating every train.eval_every steps from step 0. Held out: --held-out FILE, else "
                    "the last held_out_docs (300) non-empty lines of --data (the rest is training data). Writes "
                    "results.md (ranked by bits per byte), results.json, step0_bpb.png and bpb_curves.png in --out. "
                    "Finished parts (a transfer, its step-0 eval, its training run) are reused while their config "
                    "is unchanged.",
        epilog="strategies: plain names (" + ", ".join(transfer_study.DEFAULT_STRATEGIES) + "; the default is all "
               "of them) or, in YAML, entries like {name: clp-topk+center, strategy: clp-topk, center_helper: true} "
               "with any of " + ", ".join(transfer_study.OPTION_KEYS) + ". Other keys: eval.seq_len/batch_size/"
               "dtype, train.eval_every/seq_len/batch_size/seed/learning_rate/warmup_steps/schedule/weight_decay/"
               "embeddings_only_steps, held_out_docs, matching, seed, mesh.*, transfer_mesh.*")
    tr.add_argument("--source", help="source HF model dir (with tokenizer)")
    tr.add_argument("--helper", help="small target-language HF model dir; its tokenizer is the target's")
    tr.add_argument("--helper-tokenizer", help="target tokenizer dir, for studies of strategies needing no helper")
    tr.add_argument("--data", help="UTF-8 text, one document per line (training data; and held-out unless "
                                   "--held-out)")
    tr.add_argument("--held-out", help="held-out text file (default: the last held_out_docs lines of --data)")
    tr.add_argument("--strategies", help="comma-separated names (default: every strategy and "
                                         f"{', '.join(transfer_study.VARIANTS)})")
    tr.add_argument("--steps", type=int, help="continued-pretraining steps per strategy (default 0: step 0 only)")
    tr.add_argument("--out", help="output dir (default transfer_study); rerunning reuses unchanged parts")
    add_config_args(tr)
    tr.set_defaults(func=run_transfer_study)


def run_transfer_study(args: argparse.Namespace) -> int:
    if args.strategies is not None:  # a YAML flow list for the override
        args.strategies = "[" + ", ".join(s.strip() for s in args.strategies.split(",") if s.strip()) + "]"
    cfg = resolve_config(transfer_study.TransferStudyConfig, args, {
        "source": "source", "helper": "helper", "helper_tokenizer": "helper_tokenizer", "data": "data",
        "held_out": "held_out", "strategies": "strategies", "steps": "train.steps", "out": "out"})
    print_result(transfer_study.run_study(cfg))
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(StudyConfig, args, {})
    use_compilation_cache(os.path.abspath(os.path.join(cfg.run_dir, "xla_cache")))  # every cell has the same shapes
    print_result(run_clt_study(cfg))
    return 0
