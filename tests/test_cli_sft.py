"""`clp-jax sft`: multi-task instruction tuning through the shared trainer, loss on responses only."""

import json
import os
import pathlib

import yaml
from train_setup import make_train_config

from clp_jax.cli.main import main
from clp_jax.config import load_config
from clp_jax.posttrain.tasks import math_problems
from clp_jax.posttrain.tasks import write_jsonl as write_jsonl_task
from clp_jax.train.config import TrainConfig
from clp_jax.train.metrics import read_metrics


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_sft_multitask_run(tmp_path, capsys):
    config = make_train_config(tmp_path, steps=6)
    cfg = yaml.safe_load(open(config))
    qa = [{"inputs": f"what is {a} plus {b}", "targets": f"it is {a + b}", "language": "en"}
          for a in range(12) for b in range(3)]
    chat = [{"inputs": f"guten morgen {i}", "targets": f"guten morgen, wie geht es dir {i}", "language": "de"}
            for i in range(40)]
    write_jsonl(tmp_path / "math.jsonl", qa)
    write_jsonl(tmp_path / "chat.jsonl", chat)
    cfg["data"] = {"sources": [{"name": "math-en", "path": str(tmp_path / "math.jsonl"), "task": "math"},
                               {"name": "chat-de", "path": str(tmp_path / "chat.jsonl"), "task": "dialogue"}],
                   "mixture": {"kind": "explicit", "weights": {"math-en": 0.5, "chat-de": 0.5}},
                   "seq_len": 32, "batch_size": 8, "eval_documents": 4}
    cfg["run_dir"] = str(tmp_path / "sft")
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["sft", "--config", str(tmp_path / "sft.yaml")])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "finished"
    saved = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())
    assert saved["data"]["mode"] == "sft"
    records = [r for r in read_metrics(str(tmp_path / "sft")) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"]
    assert "eval/math-en/loss" in records[-1] and "eval/chat-de/loss" in records[-1]
    assert all(records[-1][f"eval/{s}/bpb"] > 0 for s in ("math-en", "chat-de"))  # over response bytes
    assert os.path.isdir(tmp_path / "sft" / "hf" / "final")


EXAMPLE = pathlib.Path(__file__).parent.parent / "configs" / "sft_example.yaml"


def test_example_config_validates():
    cfg = load_config(TrainConfig, EXAMPLE)
    assert cfg.data.mode == "sft" and cfg.data.mixture.kind == "english_plus_n" and cfg.data.mixture.english == "en"
    assert [s.name for s in cfg.data.sources] == ["math-en", "math-fr"]


def test_example_config_runs_with_english_plus_n_by_language(tmp_path, monkeypatch, capsys):
    make_train_config(tmp_path)  # the tiny model stands in for the demo's helper
    monkeypatch.chdir(tmp_path)
    os.makedirs("demo_out/helper/run/hf")
    os.symlink(tmp_path / "model", "demo_out/helper/run/hf/final")
    for lang, n in (("en", 150), ("fr", 40)):  # the example's budgets, plus its 16 held-out examples
        write_jsonl_task(math_problems(lang, n + 16), f"demo_out/sft/data/math-{lang}.jsonl")
    code = main(["sft", "--config", str(EXAMPLE), "steps=2", "optimizer.warmup_steps=1", "data.seq_len=64",
                 "eval.every_steps=2", "checkpoint.every_steps=2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["status"] == "finished"
    records = [r for r in read_metrics("runs/sft_example") if "eval/math-fr/loss" in r]
    assert records and records[-1]["eval/math-en/loss"] > 0
