"""Cross-lingual transfer (CLT) study: a grid of SFT runs on controlled language mixtures, each evaluated
on seen and unseen languages (Shimabucoro et al. 2025, "A Post-trainer's Guide to Multilingual Training Data").

A cell is (model, design, tasks, N, training languages): English gets a fixed budget of examples per task,
each training language N. `design` is `single` (one task per cell) or `multi` (all tasks in one cell);
with `transfer_matrix`, extra cells train on English plus one seen language each, for a train-language x
eval-language matrix. A (task, language) pair the task does not cover (summarization is en/fr/es only) is
neither trained on nor evaluated; `validate` lists those pairs. Cells are independent;
`clp_jax.posttrain.study_run` runs them and reuses a cell while the config it was made from is unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any, Literal

import pydantic

from clp_jax.config import ConfigModel
from clp_jax.data.pipeline import DataConfig
from clp_jax.data.sources import SourceConfig
from clp_jax.errors import ClpError
from clp_jax.eval.language_id import known_languages
from clp_jax.eval.metrics import MATH_KINDS, OVERLAP_KINDS, task_metrics
from clp_jax.eval.responses import RESPONSE_METRICS
from clp_jax.posttrain.tasks import TASKS, load_jsonl_task, write_jsonl
from clp_jax.sharding import MeshConfig
from clp_jax.train.config import EvalSection, ModelSection, TrainConfig
from clp_jax.train.optimizer import OptimizerConfig


class StudyModel(ConfigModel):
    name: str
    init: str  # HF dir; "~" is expanded

    @pydantic.field_validator("init")
    @classmethod
    def _expand_user(cls, path: str) -> str:
        return os.path.expanduser(path)


class JsonlTask(ConfigModel):
    """A user task in Aya format (inputs/targets/language), split into train and eval files."""

    name: str
    kind: Literal["math", "summarization", "dialogue", "open"]
    train: str
    eval: str


class StudyTrain(ConfigModel):
    steps: int = pydantic.Field(100, ge=1)
    learning_rate: float = pydantic.Field(1e-3, gt=0)
    warmup_steps: int = pydantic.Field(10, ge=0)
    batch_size: int = pydantic.Field(16, ge=1)
    seq_len: int = pydantic.Field(64, ge=8)
    dtype: Literal["float32", "bfloat16"] = "float32"
    pack: bool = False  # several examples per row (data.pack_sft): fewer padded tokens per step
    export: bool = False  # keep each cell's fine-tuned model as an HF dir (cells/<id>/run/hf/final)

    @pydantic.model_validator(mode="after")
    def _warmup_before_end(self) -> StudyTrain:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self
    mesh: MeshConfig = MeshConfig()


class StudyEval(ConfigModel):
    examples_per_language: int = pydantic.Field(32, ge=1)
    max_new_tokens: int = pydantic.Field(32, ge=1)
    metric: str = "response_loss"  # the metric the plots show: response_*, or a task metric (`task_metrics`)


class StudyConfig(ConfigModel):
    """`clp-jax study clt`: the grid and how each cell trains and is evaluated."""

    run_dir: str
    models: list[StudyModel] = pydantic.Field(min_length=1)
    tasks: list[str | JsonlTask] = pydantic.Field(min_length=1)  # built-in: math, dialogue, summarization
    fetch_cache: str | None = None  # where `clp-jax fetch` put wiki-xx (default $CLP_JAX_CACHE, ~/.cache/clp-jax)
    english: str = "en"
    english_budget: int = pydantic.Field(200, ge=1)
    per_language: list[int] = pydantic.Field(default_factory=lambda: [0, 50])
    seen_languages: list[str] = pydantic.Field(min_length=1)
    unseen_languages: list[str] = pydantic.Field(default_factory=list)
    designs: list[Literal["single", "multi"]] = pydantic.Field(default_factory=lambda: ["single"])
    transfer_matrix: bool = False
    train: StudyTrain = StudyTrain()
    eval: StudyEval = StudyEval()
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    model: str
    design: str
    tasks: tuple[str, ...]
    n: int
    train_languages: tuple[str, ...]

    @property
    def id(self) -> str:
        langs = "+".join(self.train_languages) or "none"
        return f"{self.model}__{self.design}__{'+'.join(self.tasks)}__n{self.n}__{langs}"


def task_name(task: str | JsonlTask) -> str:
    return task if isinstance(task, str) else task.name


def task_kind(task: str | JsonlTask) -> str:
    return TASKS[task].kind if isinstance(task, str) else task.kind


def task_languages(task: str | JsonlTask) -> set[str]:
    """The languages a task has examples in: a built-in task's list, a JSONL task's eval file's languages."""
    if isinstance(task, str):
        return set(TASKS[task].languages)
    return {row["language"] for row in load_jsonl_task(task.eval, task.kind)}


def coverage(cfg: StudyConfig) -> dict[str, list[str]]:
    """Task name -> the study's languages (English, seen, unseen) it covers, in config order."""
    languages = [cfg.english, *cfg.seen_languages, *cfg.unseen_languages]
    out = {}
    for task in cfg.tasks:
        has = task_languages(task)
        out[task_name(task)] = [lang for lang in languages if lang in has]
    return out


def validate(cfg: StudyConfig) -> list[str]:
    """Clear errors before any training (unknown tasks or metric, overlapping language lists, duplicates, a task
    without English or without any seen language); returns the skipped (task, language) pairs, one line each."""
    for t in cfg.tasks:
        if isinstance(t, str) and t not in TASKS:
            raise ClpError(f"unknown task {t!r} (built-in: {', '.join(TASKS)}; or give name/kind/train/eval "
                           "for an Aya-format JSONL task)")
    names = [task_name(t) for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise ClpError(f"task names must be unique: {names}")
    overlap = set(cfg.seen_languages) & set(cfg.unseen_languages)
    if overlap or cfg.english in cfg.seen_languages + cfg.unseen_languages:
        raise ClpError(f"seen_languages and unseen_languages must be disjoint and exclude {cfg.english!r}")
    if any(n < 0 for n in cfg.per_language):
        raise ClpError("per_language values must be >= 0")
    metrics = dict.fromkeys([*RESPONSE_METRICS, *(m for t in cfg.tasks for m in task_metrics(task_kind(t)))])
    if cfg.eval.metric not in metrics:
        raise ClpError(f"eval.metric {cfg.eval.metric!r} is not a metric of this study (one of: {', '.join(metrics)})")
    unknown = [lang for lang in [cfg.english, *cfg.seen_languages, *cfg.unseen_languages]
               if lang not in known_languages()]
    if unknown:
        raise ClpError(f"the language check knows no language {', '.join(unknown)} (ISO 639-1 codes, e.g. 'fr')")
    skipped = []
    for name, covered in coverage(cfg).items():
        if cfg.english not in covered or not set(covered) & set(cfg.seen_languages):
            raise ClpError(f"task {name!r} needs examples in {cfg.english!r} and in a seen language "
                           f"({', '.join(cfg.seen_languages)}); it covers {', '.join(covered) or 'none of them'}")
        skipped += [f"task {name!r} has no {lang!r} examples: not trained or evaluated in {lang!r}"
                    for lang in [*cfg.seen_languages, *cfg.unseen_languages] if lang not in covered]
    return skipped


def cells(cfg: StudyConfig) -> list[Cell]:
    """Every cell of the grid, in a stable order."""
    names = tuple(task_name(t) for t in cfg.tasks)
    out = []
    for model in cfg.models:
        for design in cfg.designs:
            task_sets = [(t,) for t in names] if design == "single" else [names]
            for tasks in task_sets:
                for n in sorted(set(cfg.per_language)):
                    langs = tuple(cfg.seen_languages) if n > 0 else ()
                    out.append(Cell(model.name, design, tasks, n, langs))
        if cfg.transfer_matrix:  # English + one seen language at the largest N, unless the grid has it already
            n = max(cfg.per_language)
            for lang in cfg.seen_languages:
                same = [c for c in out if (c.model, c.tasks, c.n, c.train_languages) == (model.name, names, n, (lang,))]
                if not same:
                    out.append(Cell(model.name, "multi", names, n, (lang,)))
    return list(dict.fromkeys(out))


def _examples(cfg: StudyConfig, task: str | JsonlTask, language: str, n: int, split: str) -> list[dict]:
    """`n` examples of a task in a language: generated (built-in) or read from the user's JSONL files."""
    if isinstance(task, str):
        rows = TASKS[task].examples(language, n, cfg.seed, split, cfg.fetch_cache)
    else:
        rows = load_jsonl_task(task.train if split == "train" else task.eval, task.kind, language=language)[:n]
    if len(rows) < n:
        raise ClpError(f"task {task_name(task)!r} has only {len(rows)} {split} examples in {language!r}, "
                       f"fewer than the {n} asked for")
    return [{k: r[k] for k in ("inputs", "targets", "language")} | {"task": task_name(task)} for r in rows]


def eval_sets(cfg: StudyConfig) -> dict[tuple[str, str], list[dict]]:
    """(task, language) -> held-out examples for English, seen and unseen languages the task covers; never
    trained on."""
    covered = coverage(cfg)
    return {(task_name(task), lang): _examples(cfg, task, lang, cfg.eval.examples_per_language, "eval")
            for task in cfg.tasks for lang in covered[task_name(task)]}


def write_cell_data(cfg: StudyConfig, cell: Cell, directory: str, held_out: set[str]) -> list[SourceConfig]:
    """JSONL files for a cell (English budget + N per training language the task covers, per task) and their
    sources."""
    os.makedirs(directory, exist_ok=True)
    by_name, covered = {task_name(t): t for t in cfg.tasks}, coverage(cfg)
    sources = []
    for name in cell.tasks:
        budgets = [(cfg.english, cfg.english_budget), *((lang, cell.n) for lang in cell.train_languages)]
        for lang, n in [(lang, n) for lang, n in budgets if lang in covered[name]]:
            rows = [r for r in _examples(cfg, by_name[name], lang, n, "train") if r["inputs"] not in held_out]
            path = os.path.join(directory, f"{name}-{lang}.jsonl")
            write_jsonl(rows, path)
            sources.append(SourceConfig(name=f"{name}-{lang}", path=path, format="jsonl", task=name, language=lang))
    return sources


def cell_train_config(cfg: StudyConfig, cell: Cell, sources: list[SourceConfig], run_dir: str) -> TrainConfig:
    """The SFT run of a cell: examples sampled in proportion to their counts (English budget + N each)."""
    model = next(m for m in cfg.models if m.name == cell.model)
    t = cfg.train
    counts = {s.name: sum(1 for _ in open(s.path, encoding="utf-8")) for s in sources}
    data = DataConfig(sources=sources, mode="sft", seq_len=t.seq_len, batch_size=t.batch_size, seed=cfg.seed,
                      pack_sft=t.pack,
                      eval_documents=0, mixture={"kind": "explicit", "weights": counts})
    return TrainConfig(run_dir=run_dir, model=ModelSection(init=model.init, dtype=t.dtype), data=data,
                       optimizer=OptimizerConfig(learning_rate=t.learning_rate, warmup_steps=t.warmup_steps,
                                                 total_steps=t.steps, max_grad_norm=1.0),
                       steps=t.steps, mesh=t.mesh, eval=EvalSection(every_steps=t.steps),
                       checkpoint={"every_steps": t.steps, "keep": 1}, log_every_steps=max(1, t.steps // 10),
                       tensorboard=False, export_final=t.export)


def result_rows(results: list[dict]) -> Iterator[dict[str, Any]]:
    """Flat rows (one per cell x task x eval language) for results.csv."""
    for r in results:
        for row in r["scores"]:
            yield {"cell": r["cell"], "model": r["model"], "design": r["design"], "tasks": "+".join(r["tasks"]),
                   "n": r["n"], "train_languages": "+".join(r["train_languages"]), **row}


__all__ = ["Cell", "StudyConfig", "cells", "coverage", "eval_sets", "validate", "MATH_KINDS", "OVERLAP_KINDS",
           "task_kind"]
