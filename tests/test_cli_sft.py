"""`clp-jax sft`: multi-task instruction tuning through the shared trainer, loss on responses only."""

import json
import os
import pathlib

import numpy as np
import pytest
import torch
import transformers
import yaml
from train_setup import make_train_config

from clp_jax.cli.main import main
from clp_jax.config import load_config
from clp_jax.data.pipeline import build_data
from clp_jax.hf.tokenizer import load_tokenizer
from clp_jax.posttrain.tasks import math_problems
from clp_jax.posttrain.tasks import write_jsonl as write_jsonl_task
from clp_jax.train.config import TrainConfig
from clp_jax.train.run_log import read_metrics


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def response_only_oracle(model_dir, rows, pairs):
    """(mean nll, count) of the response tokens and (mean nll, count) of every token of one-example-per-row rows,
    by the HF model in torch. A row is the tail of a prompt (`inputs + "\\n"`, trimmed from the left when
    long), never a target, then a whole response and EOS: which one is found by its tokens."""
    tokenizer = load_tokenizer(model_dir)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = [(encode(p + "\n"), encode(r) + [tokenizer.eos_token_id]) for p, r in pairs]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    response, every = [], []
    for tokens, segments in zip(rows["tokens"], rows["segment_ids"]):
        row = tokens[segments == 1].tolist()
        kept = {len(row) - len(r) for p, r in examples
                if 1 <= len(row) - len(r) <= len(p) and row == p[len(p) - len(row) + len(r):] + r}
        assert len(kept) == 1, "a row that is not the tail of one prompt and its whole response"
        with torch.no_grad():
            logits = hf(input_ids=torch.as_tensor([row])).logits[0].double()
        nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.as_tensor(row[1:])[:, None])[:, 0]
        response += nll[kept.pop() - 1:].tolist()  # the targets after the last prompt token
        every += nll.tolist()
    return (float(np.mean(response)), len(response)), (float(np.mean(every)), len(every))


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
    # the first step's loss is the initial model's on the first batch: over response tokens only
    run_cfg = load_config(TrainConfig, tmp_path / "sft" / "config.yaml")
    first_batch = next(build_data(run_cfg.data, load_tokenizer(run_cfg.model.init), process_index=0,
                                  process_count=1).train)
    pairs = [(r["inputs"], r["targets"]) for r in qa + chat]
    (loss, count), (every_loss, every_count) = response_only_oracle(run_cfg.model.init, first_batch, pairs)
    assert records[0]["step"] == 1 and records[0]["tokens"] == count < every_count
    assert records[0]["loss"] == pytest.approx(loss, abs=1e-5)
    assert abs(every_loss - loss) > 1e-3  # so a loss that also weighted the prompt tokens would fail
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


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_sft_from_converted_gguf_uses_its_chat_template(tmp_path, capsys):
    """A GGUF file's `tokenizer.chat_template` survives `clp-jax convert`, and `clp-jax sft` on the converted dir
    formats examples with it: the loss covers exactly the tokens of the template's assistant turn."""
    from test_gguf import case_qwen2, random_model, write_gguf

    cfg, vocab, opts = case_qwen2()
    gguf_path = write_gguf(tmp_path / "tiny.gguf", "qwen2", random_model(cfg), vocab,
                           **dict(opts, chat_template=CHAT_TEMPLATE))
    model_dir = tmp_path / "hf"
    assert main(["convert", "--gguf", str(gguf_path), "--out", str(model_dir)]) == 0, capsys.readouterr().err
    pairs = [(f"what is {a} plus {b}", f"it is {a + b}") for a in range(6) for b in range(3)]
    write_jsonl(tmp_path / "qa.jsonl", [{"inputs": p, "targets": r, "language": "en"} for p, r in pairs])
    cfg = yaml.safe_load(open(make_train_config(tmp_path, steps=2, **{"optimizer.warmup_steps": 1})))
    cfg["model"] = {"init": str(model_dir)}
    cfg["data"] = {"sources": [{"name": "qa", "path": str(tmp_path / "qa.jsonl"), "task": "math"}],
                   "seq_len": 48, "batch_size": 8, "eval_documents": 2}
    cfg["run_dir"] = str(tmp_path / "sft")
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["sft", "--config", str(tmp_path / "sft.yaml")]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "finished"

    tokenizer = load_tokenizer(str(model_dir))
    run_cfg = load_config(TrainConfig, tmp_path / "sft" / "config.yaml")
    rows = next(build_data(run_cfg.data, tokenizer, process_index=0, process_count=1).train)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # the template rendered by hand: user turn + generation prompt, then the assistant text and its end-of-turn
    rendered = {tuple(encode(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n")):
                tuple(encode(f"{r}<|im_end|>\n")) for p, r in pairs}
    for tokens, segments, weights in zip(rows["tokens"], rows["segment_ids"], rows["loss_weights"]):
        for seg in set(segments.tolist()) - {0}:
            at = np.flatnonzero(segments == seg)
            response = tuple(tokens[at[1:]][weights[at[:-1]] == 1].tolist())
            prompt = tuple(tokens[at][:len(at) - len(response)].tolist())
            assert rendered.get(prompt) == response, tokenizer.decode(list(prompt) + list(response))
    assert tokenizer.eos_token == "<|im_end|>"  # so plain formatting would end responses without the "\n"
