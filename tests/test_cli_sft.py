"""`clp-jax sft`: multi-task instruction tuning through the shared trainer, loss on responses only."""

import json
import os

import yaml
from train_setup import make_train_config

from clp_jax.cli.main import main
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
