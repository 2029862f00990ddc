"""`clp-jax eval` end to end: JSON result line, resolved config saved, clear errors and exit codes."""

import json
import math

import pytest
import yaml
from conftest import WORDS_EN, make_sentences
from hf_models import make_hf_model

from clp_jax.cli.main import main


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_json_and_saves_config(en_gpt2_dir, tmp_path, capsys, en_tokenizer):
    data = tmp_path / "text.txt"
    lines = make_sentences(WORDS_EN, 12, seed=9) + ["The café is small 😀."]
    data.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    code, out, err = run_cli(["eval", "--model", en_gpt2_dir, "--data", data, "--seq-len", 32, "--batch-size", 3,
                              "--out", tmp_path / "run", "mesh.data=4", "mesh.fsdp=2"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert {"loss", "ppl", "tokens", "bits_per_byte", "bytes"} <= set(result)
    assert result["documents"] == 13 and result["tokens"] > 13
    # no BOS: the bytes of each line (of its kept tokens' text when truncated) but those of its first token
    covered = []
    for t in lines:
        ids = en_tokenizer(t)["input_ids"]
        kept = t if len(ids) <= 32 else en_tokenizer.decode(ids[:32])
        first = en_tokenizer.decode(ids[:1])
        assert t.startswith(kept) and t.startswith(first)
        covered.append(len(kept.encode()) - len(first.encode()))
    assert result["bytes"] == sum(covered) and sum(len(t) for t in lines) > sum(covered)  # some lines truncated
    expected_bpb = result["loss"] * result["tokens"] / (math.log(2) * result["bytes"])
    assert abs(result["bits_per_byte"] - expected_bpb) < 1e-9 * expected_bpb
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["batch_size"] == 3 and saved["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    saved_result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved_result["loss"] == result["loss"] and saved_result["bits_per_byte"] == result["bits_per_byte"]
    code, out2, _ = run_cli(["eval", "--model", en_gpt2_dir, "--data", data, "--seq-len", 32, "--batch-size",
                             100000], capsys)  # capped at the 13 documents: the same 16 rows as --batch-size 12
    assert abs(json.loads(out2.strip().splitlines()[-1])["loss"] - result["loss"]) < 1e-6


def test_eval_errors(en_gpt2_dir, tmp_path, capsys, en_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe broken\n")
    small = tmp_path / "small"
    make_hf_model("gpt2", vocab_size=len(en_tokenizer) - 10).save_pretrained(small)
    en_tokenizer.save_pretrained(small)
    cases = [
        (["--model", tmp_path / "missing", "--data", empty], "missing: model directory not found"),
        (["--model", en_gpt2_dir, "--data", tmp_path / "none.txt", "--seq-len", 32], "none.txt: data file not found"),
        (["--model", en_gpt2_dir, "--data", tmp_path, "--seq-len", 32], "is a directory, not a data file"),
        (["--model", en_gpt2_dir, "--data", empty, "--seq-len", 32], "empty.txt: data file is empty"),
        (["--model", en_gpt2_dir, "--data", bad, "--seq-len", 32], "bad.txt: line 2 is not valid UTF-8"),
        (["--model", small, "--data", bad, "--seq-len", 32], "tokenizer has"),
        (["--model", en_gpt2_dir, "--data", bad], "seq_len 1024 exceeds the model's 64 learned positions"),
        (["--model", en_gpt2_dir, "--data", empty, "--seq-len", 1], "seq_len"),
        (["--model", en_gpt2_dir, "--data", empty, "mesh.dta=2"], "did you mean 'mesh.data'"),
    ]
    capsys.readouterr()
    for argv, fragment in cases:
        code, out, err = run_cli(["eval", *argv], capsys)
        assert code == 2, (argv, err)
        assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert out == ""
    assert not (tmp_path / "run").exists()


def test_eval_batch_that_does_not_fit_is_refused_before_compiling(en_gpt2_dir, tmp_path, capsys, monkeypatch,
                                                                  en_tokenizer):
    from clp_jax.eval import perplexity
    from clp_jax.hf.reader import read_config
    from clp_jax.sharding import make_mesh

    data = tmp_path / "text.txt"
    lines = make_sentences(WORDS_EN, 13, seed=9)
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg, mesh = read_config(en_gpt2_dir), make_mesh(data=-1)
    docs, _, _ = perplexity.encode_documents(en_tokenizer, lines, 32)
    length = perplexity._bucket(max(len(d) for d in docs), 32)
    free = perplexity.eval_device_bytes(cfg, mesh, 8, length) + 1  # one row per device fits, two do not
    assert perplexity.eval_device_bytes(cfg, mesh, 16, length) > free
    monkeypatch.setattr(perplexity, "device_budget", lambda mesh: (free, "test budget"))
    monkeypatch.setattr(perplexity, "load_params", lambda *a, **k: pytest.fail("loaded the weights anyway"))
    code, out, err = run_cli(["eval", "--model", en_gpt2_dir, "--data", data, "--seq-len", 32, "--batch-size", 13],
                             capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"eval batch of 13 documents x {length} tokens needs about" in err and "test budget" in err, err
    assert "pass --batch-size 8 or less" in err, err
    monkeypatch.setattr(perplexity, "device_budget", lambda mesh: (1, "test budget"))
    code, _, err = run_cli(["eval", "--model", en_gpt2_dir, "--data", data, "--seq-len", 32], capsys)
    assert code == 2 and "pass a smaller --seq-len" in err, err


def test_device_budget_on_cpu_is_a_share_of_available_host_ram():
    from clp_jax.memory import device_budget, host_available_bytes
    from clp_jax.sharding import make_mesh

    free, source = device_budget(make_mesh(data=-1))
    assert 0 < free * 8 <= host_available_bytes() and "8 CPU devices" in source
