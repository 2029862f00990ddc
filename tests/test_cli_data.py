"""`clp-jax data`: mixture report printed and saved; errors before any work."""

import json

import yaml

from clp_jax.cli.main import main
from clp_jax.data.demo_files import write_demo_corpus


def test_data_command_prints_and_saves_the_mixture(tmp_path, capsys, en_tokenizer):
    paths = write_demo_corpus(str(tmp_path / "corpus"), ["en", "de", "es"])
    en_tokenizer.save_pretrained(tmp_path / "tok")
    cfg = {"tokenizer": str(tmp_path / "tok"),
           "data": {"sources": [{"name": lang, "path": p, "language": lang} for lang, p in paths.items()],
                    "mixture": {"kind": "temperature", "alpha": 0.3}, "seq_len": 64, "batch_size": 8,
                    "eval_documents": 8, "cache_dir": str(tmp_path / "cache")}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["data", "--config", str(tmp_path / "data.yaml"), "--steps", "100", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    shares = result["shares"]
    assert set(shares) == {"en", "de", "es"} and abs(sum(shares.values()) - 1) < 1e-9
    assert shares["de"] < shares["es"] < shares["en"]  # German is the smallest corpus
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    sizes = {s["name"]: s["size"] for s in report["sources"]}
    p = {k: v ** 0.3 for k, v in sizes.items()}
    for k in p:  # temperature sampling p_l ∝ n_l^0.3 over training tokens
        assert abs(shares[k] - p[k] / sum(p.values())) < 1e-9
    assert all(s["expected_epochs"] > 0 for s in report["sources"])
    assert "de" in err and "share" in err.lower()
    assert (tmp_path / "run" / "config.yaml").exists()


def test_data_command_rejects_all_zero_weights(tmp_path, capsys, en_tokenizer):
    en_tokenizer.save_pretrained(tmp_path / "tok")
    cfg = {"tokenizer": str(tmp_path / "tok"),
           "data": {"sources": [{"name": "en", "path": str(tmp_path / "missing.txt"), "language": "en"}],
                    "mixture": {"kind": "explicit", "weights": {"en": 0.0}}}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["data", "--config", str(tmp_path / "data.yaml")]) == 2
    err = capsys.readouterr().err
    assert "zero" in err and err.count("\n") == 1
