"""`clp-jax study clt`: grid enumeration, validation, an end-to-end tiny grid, resume, results and plots."""

import csv
import json

import pytest
import yaml
from train_setup import make_train_config
from wiki_cache import write_wiki_cache

from clp_jax.cli.main import main
from clp_jax.errors import ClpError
from clp_jax.posttrain import study


def config(**overrides):
    base = {"run_dir": "r", "models": [{"name": "m", "init": "x"}], "tasks": ["math", "dialogue"],
            "per_language": [0, 10, 40], "seen_languages": ["de", "es"], "unseen_languages": ["fr"],
            "designs": ["single", "multi"], "transfer_matrix": True}
    return study.StudyConfig(**{**base, **overrides})


def test_cells_cover_the_grid():
    grid = study.cells(config())
    ids = [c.id for c in grid]
    assert len(ids) == len(set(ids))
    single = [c for c in grid if c.design == "single"]
    assert len(single) == 2 * 3  # 2 tasks x 3 N
    assert {c.train_languages for c in single} == {(), ("de", "es")}
    multi = [c for c in grid if c.design == "multi"]
    assert {c.train_languages for c in multi} == {(), ("de", "es"), ("de",), ("es",)}  # grid + transfer matrix
    assert all(c.n == 40 for c in multi if len(c.train_languages) == 1)


def test_validation_errors():
    with pytest.raises(ClpError, match="unknown task"):
        study.validate(config(tasks=["poetry"]))
    with pytest.raises(ClpError, match="disjoint"):
        study.validate(config(unseen_languages=["de"]))
    with pytest.raises(ClpError, match="eval.metric 'chrf_lang' is not a metric of this study"):
        study.validate(config(tasks=["math"], eval={"metric": "chrf_lang"}))
    assert study.validate(config(eval={"metric": "chrf_lang"})) == []  # dialogue has it
    with pytest.raises(ClpError, match="knows no language xx"):
        study.validate(config(unseen_languages=["xx"]))


def coverage_config(tmp_path, **overrides):
    for lang in ("en", "fr", "es"):
        write_wiki_cache(tmp_path / "cache", lang, 100)
    return config(**{"tasks": ["math", "summarization"], "seen_languages": ["fr", "de"],
                     "unseen_languages": ["es", "it"], "fetch_cache": str(tmp_path / "cache"), "english_budget": 10,
                     "eval": {"examples_per_language": 4}, **overrides})


def test_pairs_a_task_does_not_cover_are_skipped(tmp_path):
    cfg = coverage_config(tmp_path)
    assert study.validate(cfg) == ["task 'summarization' has no 'de' examples: not trained or evaluated in 'de'",
                                   "task 'summarization' has no 'it' examples: not trained or evaluated in 'it'"]
    assert study.coverage(cfg) == {"math": ["en", "fr", "de", "es", "it"], "summarization": ["en", "fr", "es"]}
    sets = study.eval_sets(cfg)
    assert sorted(sets) == sorted([("math", lang) for lang in ("en", "fr", "de", "es", "it")]
                                  + [("summarization", lang) for lang in ("en", "fr", "es")])
    assert all(len(rows) == 4 and all(r["language"] == lang and r["task"] == task for r in rows)
               for (task, lang), rows in sets.items())
    held_out = {e["inputs"] for rows in sets.values() for e in rows}
    cell = study.Cell("m", "multi", ("math", "summarization"), 5, ("fr", "de"))
    sources = study.write_cell_data(cfg, cell, str(tmp_path / "data"), held_out)
    assert [s.name for s in sources] == ["math-en", "math-fr", "math-de", "summarization-en", "summarization-fr"]
    summaries = [json.loads(line) for line in open(tmp_path / "data" / "summarization-fr.jsonl")]
    assert len(summaries) == 5 and not {r["inputs"] for r in summaries} & held_out


def test_a_task_without_english_or_any_seen_language_is_an_error(tmp_path):
    with pytest.raises(ClpError, match=r"task 'summarization' needs examples in 'en' and in a seen language "
                                       r"\(de, it\); it covers en, es"):
        study.validate(coverage_config(tmp_path, seen_languages=["de", "it"], unseen_languages=["es"]))
    with pytest.raises(ClpError, match="needs the dataset wiki-en.*run `clp-jax fetch wiki-en`"):
        study.eval_sets(config(tasks=["summarization"], seen_languages=["fr"], unseen_languages=[],
                               fetch_cache=str(tmp_path / "empty")))


def test_tiny_study_runs_resumes_and_plots(tmp_path, capsys):
    make_train_config(tmp_path)  # tiny GPT-2 + tokenizer in tmp_path/model
    cfg = {"run_dir": str(tmp_path / "study"), "models": [{"name": "tiny", "init": str(tmp_path / "model")}],
           "tasks": ["math"], "english_budget": 24, "per_language": [0, 12], "seen_languages": ["de"],
           "unseen_languages": ["fr"], "transfer_matrix": True,
           "train": {"steps": 3, "batch_size": 8, "seq_len": 64, "warmup_steps": 1},
           "eval": {"examples_per_language": 4, "max_new_tokens": 4}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["study", "clt", "--config", str(tmp_path / "study.yaml")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["cells"] == 2 and set(out["plots"]) == {"metric_vs_n", "seen_unseen_gap", "transfer_matrix"}
    for path in out["plots"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(tmp_path / "study" / "results.csv")))
    assert len(rows) == 2 * 3  # 2 cells x (en, de, fr)
    assert {r["language"] for r in rows} == {"en", "de", "fr"}
    assert all(float(r["response_loss"]) > 0 and 0 <= float(r["exact_match"]) <= 100 for r in rows)
    assert all(float(r["response_bpb"]) > 0 for r in rows)
    assert all(0 <= float(r["exact_match_lang"]) <= float(r["exact_match"]) for r in rows)
    assert all(0 <= float(r["language_ok"]) <= 100 for r in rows)
    seen = {(r["n"], r["language"]): r["seen"] for r in rows}
    assert seen[("12", "de")] == "True" and seen[("12", "fr")] == "False" and seen[("0", "de")] == "False"
    assert main(["study", "clt", "--config", str(tmp_path / "study.yaml")]) == 0  # unchanged: nothing retrained
    out, err = capsys.readouterr()
    assert err.count("unchanged, reused") == 2 and "training" not in err
    assert json.loads(out.strip().splitlines()[-1])["reused"] == 2


def test_changed_setting_redoes_the_cell_and_the_results_show_it(tmp_path, capsys):
    make_train_config(tmp_path)
    cfg = {"run_dir": str(tmp_path / "study"), "models": [{"name": "tiny", "init": str(tmp_path / "model")}],
           "tasks": ["math"], "english_budget": 16, "per_language": [8], "seen_languages": ["de"],
           "train": {"steps": 2, "batch_size": 8, "seq_len": 64, "warmup_steps": 1},
           "eval": {"examples_per_language": 2, "max_new_tokens": 2}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    run = ["study", "clt", "--config", str(tmp_path / "study.yaml")]
    assert main(run) == 0
    capsys.readouterr()
    assert main([*run, "train.steps=3", "eval.metric=response_bpb"]) == 0  # the metric only changes the plots
    out, err = capsys.readouterr()
    changed = [line for line in err.splitlines() if "config changed" in line]
    assert len(changed) == 1 and "(train.steps)" in changed[0] and "redoing" in changed[0]
    assert "training" in err and json.loads(out.strip().splitlines()[-1])["reused"] == 0
    cell = json.load(open(tmp_path / "study" / "results.json"))[0]
    assert cell["config"]["train"]["steps"] == 3
    saved = json.load(open(tmp_path / "study" / "cells" / cell["cell"] / "result.json"))
    assert saved["config"]["train"]["steps"] == 3 and saved["key"] == cell["key"]
    assert yaml.safe_load(open(tmp_path / "study" / "config.yaml"))["train"]["steps"] == 3
    assert main([*run, "train.steps=3"]) == 0  # unchanged again
    out, err = capsys.readouterr()
    assert "unchanged, reused" in err and "training" not in err and json.loads(out.splitlines()[-1])["reused"] == 1
