"""`clp-jax study transfer`: step-0 numbers equal `clp-jax eval`, curves start there, reruns reuse unchanged parts."""

import json
import math
import os

import numpy as np
import pytest
import yaml
from conftest import WORDS_DE, make_sentences
from hf_models import make_hf_model

from clp_jax.cli.main import main
from clp_jax.transfer.study import TransferStudyConfig, resolve_strategies
from clp_jax.transfer.study_report import mean_cosine_to_shared_mean

HELD = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory, en_tokenizer, de_tokenizer):
    root = tmp_path_factory.mktemp("study_transfer")
    make_hf_model("llama-tied", vocab_size=len(en_tokenizer)).save_pretrained(root / "source")
    en_tokenizer.save_pretrained(root / "source")
    make_hf_model("gpt2", vocab_size=len(de_tokenizer), n_embd=16, n_head=2).save_pretrained(root / "helper")
    de_tokenizer.save_pretrained(root / "helper")
    texts = make_sentences(WORDS_DE, 100, seed=5)
    (root / "data.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    return root, texts


def study(root, capsys, top_k=5):
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump({
        "strategies": ["clp", "mean", {"name": "topk", "strategy": "clp-topk", "top_k": top_k}],
        "held_out_docs": HELD, "eval": {"seq_len": 64},
        "train": {"eval_every": 1, "seq_len": 32, "batch_size": 8, "learning_rate": 1e-3}}))
    code = main(["study", "transfer", "--config", str(config), "--source", str(root / "source"), "--helper",
                 str(root / "helper"), "--data", str(root / "data.txt"), "--steps", "2", "--out", str(root / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def clp_eval(model, data, capsys):
    assert main(["eval", "--model", str(model), "--data", str(data), "--seq-len", "64"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def mtimes(out):
    return {f"{name}/{p}": os.stat(out / "strategies" / name / p).st_mtime_ns for name in ("clp", "mean", "topk")
            for p in ("model/config.json", "transfer.json", "step0.json", "train.json", "train/study_key.json")}


def test_study_matches_eval_reuses_parts_and_redoes_only_a_changed_one(setup, capsys):
    root, texts = setup
    out = root / "out"
    summary, _ = study(root, capsys)
    assert summary["redone"] == {"transfer": 3, "step0": 3, "train": 3}
    held_path = out / "data" / "held_out.txt"
    assert held_path.read_text(encoding="utf-8").splitlines() == texts[-HELD:]  # the last lines of --data
    assert (out / "data" / "train.txt").read_text(encoding="utf-8").splitlines() == texts[:-HELD]
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["strategies"]}
    assert set(rows) == {"clp", "mean", "topk"} and rows["topk"]["options"] == {"top_k": 5}
    for name, row in rows.items():  # step 0 = an independent `clp-jax eval` of the transferred dir
        want = clp_eval(out / "strategies" / name / "model", held_path, capsys)
        assert row["step0"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert row["step0"]["bpb"] == pytest.approx(want["bits_per_byte"], rel=1e-6)
        assert [p["step"] for p in row["curve"]] == [0, 1, 2]
        assert row["curve"][0]["loss"] == pytest.approx(row["step0"]["loss"], rel=1e-5)  # Trainer's params at 0
        assert row["curve"][0]["bpb"] == pytest.approx(row["step0"]["bpb"], rel=1e-5)
        assert row["curve"][2]["loss"] != row["curve"][0]["loss"]
        assert sum(row["transfer"]["ill_conditioned"].values()) == row["transfer"]["degenerate_rows"]
    assert rows["mean"]["transfer"]["mean_cos_to_shared_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows["clp"]["transfer"]["mean_cos_to_shared_mean"] < 1.0
    refs = results["references"]
    source = clp_eval(root / "source", held_path, capsys)
    assert refs["source"]["bpb"] == pytest.approx(source["bits_per_byte"], rel=1e-6)
    assert math.isfinite(refs["helper"]["bpb"]) and refs["helper"]["loss"] > 0
    finals = [rows[n]["curve"][-1]["bpb"] for n in results["ranking"]]
    assert finals == sorted(finals) and summary["ranking"] == results["ranking"]
    table = [ln for ln in (out / "results.md").read_text().splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [ln.split(" | ")[1] for ln in table] == results["ranking"]
    assert (out / "step0_bpb.png").stat().st_size and (out / "bpb_curves.png").stat().st_size
    assert not (out / "strategies" / "clp" / "train" / "checkpoints").exists()

    before = mtimes(out)
    summary, err = study(root, capsys)  # unchanged: everything reused, nothing rewritten
    assert summary["redone"] == {"transfer": 0, "step0": 0, "train": 0} and "training: unchanged, reused" in err
    assert mtimes(out) == before
    summary, err = study(root, capsys, top_k=3)  # one option changed: only that strategy is redone
    assert summary["redone"] == {"transfer": 1, "step0": 1, "train": 1}
    assert "topk transfer: config changed (top_k), redoing" in err
    after = mtimes(out)
    assert {k for k in before if before[k] != after[k]} == {k for k in before if k.startswith("topk/")}
    results = json.loads((out / "results.json").read_text())
    assert next(r for r in results["strategies"] if r["name"] == "topk")["options"] == {"top_k": 3}


def test_mean_cosine_to_shared_mean():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(10, 4))
    target = rng.normal(size=(6, 4))
    tgt_ids, src_ids = np.array([0, 2]), np.array([3, 7])
    target[tgt_ids] = source[src_ids]
    mean = source[src_ids].mean(0)
    computed = [1, 3, 4, 5]
    want = np.mean([target[i] @ mean / np.linalg.norm(target[i]) / np.linalg.norm(mean) for i in computed])
    assert mean_cosine_to_shared_mean(target, source, tgt_ids, src_ids) == pytest.approx(want)
    target[computed] = 3 * mean
    assert mean_cosine_to_shared_mean(target, source, tgt_ids, src_ids) == pytest.approx(1.0)


def test_strategy_entries_resolve_and_bad_ones_are_one_line_errors(tmp_path, capsys):
    cfg = TransferStudyConfig(source="s", helper="h", data="d", strategies=[
        "clp", "clp-topk+center", {"name": "omp-8", "strategy": "omp", "omp_k": 8, "center_helper": True}])
    specs = resolve_strategies(cfg)
    assert [(s.name, s.strategy, s.options()) for s in specs] == [
        ("clp", "clp", {}), ("clp-topk+center", "clp-topk", {"center_helper": True}),
        ("omp-8", "omp", {"omp_k": 8, "center_helper": True})]
    assert len(resolve_strategies(TransferStudyConfig(source="s", helper="h", data="d"))) == 13  # the default list
    (tmp_path / "data.txt").write_text("a b\n")
    for argv, fragment in ((["--strategies", "clp,magic"], "unknown strategy 'magic'"),
                           (["--strategies", "clp,clp"], "must be unique"),
                           (["--strategies", "omp", "helper=null", "helper_tokenizer=x"], "need --helper")):
        code = main(["study", "transfer", "--source", "s", "--helper", "h", "--data", str(tmp_path / "data.txt"),
                     "--out", str(tmp_path / "out"), *argv])
        _, err = capsys.readouterr()
        assert code == 2 and fragment in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
