"""`clp-jax study clt`: grid enumeration, validation, an end-to-end tiny grid, resume, results and plots."""

import csv
import json

import pytest
import yaml
from train_setup import make_train_config

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
