"""Running a CLT study (what `clp-jax study clt` does): every cell of the grid trained and evaluated, reusing
the cells whose config is unchanged, then results.csv, results.json and the plots.

Layout of ``run_dir``::

    config.yaml                          the resolved study config of the latest run
    cells/<id>/result.json               the cell's scores, the hash of the config they came from and that config
    cells/<id>/data/, cells/<id>/run/    the cell's training JSONL files and the Trainer's run dir (its checkpoints
                                         are deleted once the cell is scored; ``train.export`` keeps its HF model)
    results.csv, results.json, metric_vs_n.png, seen_unseen_gap.png, transfer_matrix.png

A cell's config holds its model dir, its grid coordinates, the settings it trains and is evaluated with and
the sha256 of its training files and of its eval examples, so changing the grid's other cells, the plotted
metric or the mesh reuses it, and anything else redoes it (the changed keys are named on stderr). Models
are keyed by path, as in `study transfer`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import sys
from typing import Any

from clp_jax.config import config_to_dict, save_config
from clp_jax.data.sources import SourceConfig
from clp_jax.errors import stopped_run_error
from clp_jax.eval.responses import evaluate_examples
from clp_jax.files import atomic_open, write_json
from clp_jax.posttrain import study
from clp_jax.posttrain.plots import plot_gap, plot_metric_vs_n, plot_transfer_matrix
from clp_jax.train.loop import Trainer
from clp_jax.transfer.study import claim_run_dir, part_key, reuse_or_make

EvalSets = dict[tuple[str, str], list[dict]]


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def _files_hash(paths: list[str]) -> str:
    """sha256 over the files' names and bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def cell_config(cfg: study.StudyConfig, cell: study.Cell, train_files: list[str], sets: EvalSets) -> dict:
    """What a cell's result depends on: its model dir, coordinates, settings, training files and eval examples."""
    model = next(m for m in cfg.models if m.name == cell.model)
    by_name = {study.task_name(t): t for t in cfg.tasks}
    tasks = {n: t if isinstance(t, str) else config_to_dict(t) for n, t in by_name.items() if n in cell.tasks}
    cell_sets = {f"{task}/{lang}": rows for (task, lang), rows in sets.items() if task in cell.tasks}
    return {"model": os.path.abspath(model.init), "design": cell.design, "tasks": list(cell.tasks), "n": cell.n,
            "train_languages": list(cell.train_languages), "task_defs": tasks,
            "english": cfg.english, "english_budget": cfg.english_budget, "seed": cfg.seed,
            "eval_languages": sorted({lang for _, lang in sets}),
            "train": {k: v for k, v in config_to_dict(cfg.train).items() if k not in ("mesh", "export")},
            "eval": {k: v for k, v in config_to_dict(cfg.eval).items() if k != "metric"},
            "train_data": _files_hash(train_files), "eval_sets": part_key(cell_sets)}


def _train_and_evaluate(cfg: study.StudyConfig, cell: study.Cell, cell_dir: str, sources: list[SourceConfig],
                        key: str, sets: EvalSets, label: str) -> dict:
    """The cell's SFT run (in its own run dir) and its scores on every (task, language) eval set of its tasks."""
    run_dir = os.path.join(cell_dir, "run")
    claim_run_dir(run_dir, key)
    _say(f"{label}: training")
    trainer = Trainer(study.cell_train_config(cfg, cell, sources, run_dir))
    summary = trainer.run()
    if summary["status"] != "finished":
        raise stopped_run_error(run_dir, summary)
    cell_sets = {k: v for k, v in sets.items() if k[0] in cell.tasks}
    _say(f"{label}: evaluating {len(cell_sets)} task x language sets")
    kinds = {study.task_name(t): study.task_kind(t) for t in cfg.tasks}
    scores = evaluate_examples(trainer.state.params, trainer.model_cfg, trainer.tokenizer, trainer.mesh,
                               trainer.heldout_step, cell_sets, kinds, max_new_tokens=cfg.eval.max_new_tokens,
                               seq_len=cfg.train.seq_len)
    for row in scores:
        row["seen"] = row["language"] in cell.train_languages
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # only a preempted cell resumes
    return {"cell": cell.id, "model": cell.model, "design": cell.design, "tasks": list(cell.tasks), "n": cell.n,
            "train_languages": list(cell.train_languages), "train_loss": summary.get("loss"), "scores": scores}


def run_cell(cfg: study.StudyConfig, cell: study.Cell, sets: EvalSets, label: str) -> tuple[dict, bool]:
    """A cell's result with the config it came from (reused when that config is unchanged), and whether it was
    reused."""
    cell_dir = os.path.join(cfg.run_dir, "cells", cell.id)
    held_out = {e["inputs"] for examples in sets.values() for e in examples}
    sources = study.write_cell_data(cfg, cell, os.path.join(cell_dir, "data"), held_out)
    conf = cell_config(cfg, cell, [s.path for s in sources], sets)
    result, reused = reuse_or_make(
        os.path.join(cell_dir, "result.json"), label, conf,
        lambda: _train_and_evaluate(cfg, cell, cell_dir, sources, part_key(conf), sets, label), say=_say)
    return {**result, "key": part_key(conf), "config": conf}, reused


def write_results(run_dir: str, results: list[dict], rows: list[dict]) -> None:
    """results.csv (one row per cell x task x eval language) and results.json (the cells, with their configs)."""
    flat = [{k: v for k, v in r.items() if k != "example"} for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with atomic_open(os.path.join(run_dir, "results.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    write_json(os.path.join(run_dir, "results.json"), results)


def write_plots(cfg: study.StudyConfig, rows: list[dict]) -> dict[str, str]:
    """The metric-vs-N, seen-vs-unseen and (with cells for it) transfer-matrix PNGs; name -> path."""
    metric, seen, unseen = cfg.eval.metric, cfg.seen_languages, cfg.unseen_languages
    plots = {"metric_vs_n": os.path.join(cfg.run_dir, "metric_vs_n.png"),
             "seen_unseen_gap": os.path.join(cfg.run_dir, "seen_unseen_gap.png")}
    plot_metric_vs_n(rows, metric, seen, unseen, plots["metric_vs_n"])
    plot_gap(rows, metric, seen, unseen, plots["seen_unseen_gap"])
    matrix = os.path.join(cfg.run_dir, "transfer_matrix.png")
    all_tasks = "+".join(study.task_name(t) for t in cfg.tasks)
    if cfg.transfer_matrix and plot_transfer_matrix(rows, metric, max(cfg.per_language), all_tasks, matrix):
        plots["transfer_matrix"] = matrix
    return plots


def run_clt_study(cfg: study.StudyConfig) -> dict[str, Any]:
    """Train and evaluate every cell (reusing unchanged ones), write the results and plots in ``cfg.run_dir`` and
    return the summary `clp-jax study clt` prints."""
    skipped = study.validate(cfg)
    for line in skipped:
        _say(line)
    os.makedirs(cfg.run_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    grid, sets = study.cells(cfg), study.eval_sets(cfg)
    done = [run_cell(cfg, cell, sets, f"cell {i}/{len(grid)} {cell.id}") for i, cell in enumerate(grid, 1)]
    results = [result for result, _ in done]
    rows = list(study.result_rows(results))
    write_results(cfg.run_dir, results, rows)
    return {"cells": len(grid), "reused": sum(reused for _, reused in done), "rows": len(rows), "skipped": skipped,
            "run_dir": cfg.run_dir, "plots": write_plots(cfg, rows)}
