"""`clp-jax study clt`: run a cross-lingual transfer grid (resumable) and write results.csv/json and plots."""

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


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("study", parents=parents, help="experiment grids (clt: cross-lingual transfer in SFT)",
                       description="Experiment grids. `clp-jax study clt --config FILE` runs a cross-lingual "
                                   "transfer study: a fixed English budget plus N examples per seen language, "
                                   "single- or multi-task, one or more models; each cell is an SFT run evaluated "
                                   "on English, seen and unseen languages. Finished cells are skipped on rerun.")
    kinds = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    clt = kinds.add_parser("clt", parents=parents, help="cross-lingual transfer grid",
                           description="Writes run_dir/results.csv, results.json and PNG plots: metric vs N per "
                                       "language, seen-vs-unseen gap, train x eval language transfer matrix.")
    add_config_args(clt)
    clt.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


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
