"""`clp-jax study clt`: a cross-lingual transfer grid (resumable), results.csv/json and plots; `clp-jax study
transfer`: parse the flags and run `clp_jax.transfer.study.run_study`."""

from __future__ import annotations

import argparse
import csv
import os
import sys

from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.config import save_config
from clp_jax.files import atomic_open, write_json
from clp_jax.posttrain import study
from clp_jax.posttrain.plots import plot_gap, plot_metric_vs_n, plot_transfer_matrix
from clp_jax.transfer import study as transfer_study


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("study", parents=parents,
                       help="experiment grids (clt: cross-lingual transfer in SFT; transfer: embedding strategies)",
                       description="Experiment grids. `clp-jax study clt --config FILE` runs a cross-lingual "
                                   "transfer study: a fixed English budget plus N examples per seen language, "
                                   "single- or multi-task, one or more models; each cell is an SFT run evaluated "
                                   "on English, seen and unseen languages. Finished cells are skipped on rerun. "
                                   "`clp-jax study transfer` compares embedding transfer strategies on held-out "
                                   "bits per byte, at step 0 and during continued pretraining.")
    kinds = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    clt = kinds.add_parser("clt", parents=parents, help="cross-lingual transfer grid",
                           description="Writes run_dir/results.csv, results.json and PNG plots: metric vs N per "
                                       "language, seen-vs-unseen gap, train x eval language transfer matrix.")
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


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def run_transfer_study(args: argparse.Namespace) -> int:
    if args.strategies is not None:  # a YAML flow list for the override
        args.strategies = "[" + ", ".join(s.strip() for s in args.strategies.split(",") if s.strip()) + "]"
    cfg = resolve_config(transfer_study.TransferStudyConfig, args, {
        "source": "source", "helper": "helper", "helper_tokenizer": "helper_tokenizer", "data": "data",
        "held_out": "held_out", "strategies": "strategies", "steps": "train.steps", "out": "out"})
    print_result(transfer_study.run_study(cfg))
    return 0


def run(args: argparse.Namespace) -> int:
    from clp_jax.posttrain.evaluate import evaluate_examples
    from clp_jax.train.loop import Trainer
    from clp_jax.train.step import make_eval_step

    cfg = resolve_config(study.StudyConfig, args, {})
    study.validate(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    grid = study.cells(cfg)
    sets = study.eval_sets(cfg)
    held_out = {e["inputs"] for examples in sets.values() for e in examples}
    kinds = {study.task_name(t): study.task_kind(t) for t in cfg.tasks}
    results = []
    for i, cell in enumerate(grid, 1):
        cell_dir = os.path.join(cfg.run_dir, "cells", cell.id)
        result_path = os.path.join(cell_dir, "result.json")
        done = study.load_result(result_path)
        if done is not None:
            _say(f"cell {i}/{len(grid)} {cell.id}: done earlier, skipped")
            results.append(done)
            continue
        _say(f"cell {i}/{len(grid)} {cell.id}: training")
        sources = study.write_cell_data(cfg, cell, os.path.join(cell_dir, "data"), held_out)
        trainer = Trainer(study.cell_train_config(cfg, cell, sources, os.path.join(cell_dir, "run")))
        summary = trainer.run()
        _say(f"cell {i}/{len(grid)} {cell.id}: evaluating {len(sets)} task x language sets")
        eval_step = make_eval_step(trainer.model_cfg, trainer.mesh)
        cell_sets = {k: v for k, v in sets.items() if k[0] in cell.tasks}
        scores = evaluate_examples(trainer.state.params, trainer.model_cfg, trainer.tokenizer, trainer.mesh,
                                   eval_step, cell_sets, kinds, max_new_tokens=cfg.eval.max_new_tokens,
                                   seq_len=cfg.train.seq_len)
        for row in scores:
            row["seen"] = row["language"] in cell.train_languages
        result = {"cell": cell.id, "model": cell.model, "design": cell.design, "tasks": list(cell.tasks),
                  "n": cell.n, "train_languages": list(cell.train_languages),
                  "train_loss": summary.get("loss"), "scores": scores}
        write_json(result_path, result)
        results.append(result)
    rows = list(study.result_rows(results))
    _write_results(cfg.run_dir, results, rows)
    metric = cfg.eval.metric
    plots = {"metric_vs_n": os.path.join(cfg.run_dir, "metric_vs_n.png"),
             "seen_unseen_gap": os.path.join(cfg.run_dir, "seen_unseen_gap.png")}
    plot_metric_vs_n(rows, metric, cfg.seen_languages, cfg.unseen_languages, plots["metric_vs_n"])
    plot_gap(rows, metric, cfg.seen_languages, cfg.unseen_languages, plots["seen_unseen_gap"])
    matrix = os.path.join(cfg.run_dir, "transfer_matrix.png")
    all_tasks = "+".join(study.task_name(t) for t in cfg.tasks)
    if cfg.transfer_matrix and plot_transfer_matrix(rows, metric, max(cfg.per_language), all_tasks, matrix):
        plots["transfer_matrix"] = matrix
    print_result({"cells": len(grid), "rows": len(rows), "run_dir": cfg.run_dir, "plots": plots})
    return 0


def _write_results(run_dir: str, results: list[dict], rows: list[dict]) -> None:
    flat = [{k: v for k, v in r.items() if k != "example"} for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with atomic_open(os.path.join(run_dir, "results.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    write_json(os.path.join(run_dir, "results.json"), results)
