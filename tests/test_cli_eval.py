"""`clp-jax eval` end to end: JSON result line, resolved config saved, clear errors and exit codes."""

import json
import math

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
    code, out2, _ = run_cli(["eval", "--model", en_gpt2_dir, "--data", data, "--seq-len", 32, "--batch-size", 12],
                            capsys)
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
