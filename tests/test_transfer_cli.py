"""`clp-jax transfer` end to end: transformers loads the result; weights follow the CLP formula exactly."""

import json
import shutil
import tempfile

import numpy as np
import pytest
import torch
import transformers
from hf_models import make_hf_model
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

from clp_jax.cli.main import main
from clp_jax.transfer.align import align_vocabularies


def clp_oracle(source, helper, tgt_ids, src_ids):
    """Float64 re-statement of CLP: copy shared rows; others = cos-weighted mean of shared source rows."""
    source, helper = source.astype(np.float64), helper.astype(np.float64)
    h = helper / np.linalg.norm(helper, axis=1, keepdims=True)
    cos = h @ h[tgt_ids].T
    sums = cos.sum(axis=1)
    out = cos @ source[src_ids] / sums[:, None]
    out[sums <= 0] = source[src_ids].mean(axis=0)  # documented fallback for degenerate rows
    out[tgt_ids] = source[src_ids]
    return out, sums


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, en_tokenizer, de_tokenizer):
    root = tmp_path_factory.mktemp("transfer")
    for name, kind, tok, kw in (("gpt2-src", "gpt2", en_tokenizer, {}),
                                ("llama-src", "llama-gqa-untied", en_tokenizer, {}),
                                ("helper", "gpt2", de_tokenizer, dict(n_embd=16, n_head=2))):
        model = make_hf_model(kind, vocab_size=len(tok), **kw)
        if name == "helper":  # real embeddings share a common direction; one row points away from all shared ones
            a = align_vocabularies(en_tokenizer, de_tokenizer)
            with torch.no_grad():
                wte = model.transformer.wte.weight
                wte += 0.1
                missing = sorted(set(range(len(tok))) - set(a.target_ids.tolist()))
                wte[missing[0]] = -wte[torch.as_tensor(a.target_ids)].sum(0)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def transfer(argv, capsys):
    code = main(["transfer", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("source", ["gpt2-src", "llama-src"])
def test_clp_transfer_matches_formula_and_loads_in_transformers(dirs, tmp_path, capsys, source, en_tokenizer,
                                                                de_tokenizer):
    out = tmp_path / "out"
    code, stdout, err = transfer(["--source", dirs / source, "--helper", dirs / "helper", "--out", out,
                                  "--strategy", "clp"], capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["strategy"] == "clp"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("das haus")["input_ids"] == de_tokenizer("das haus")["input_ids"]
    src = load_file(str(dirs / source / "model.safetensors"))
    helper = load_file(str(dirs / "helper" / "model.safetensors"))["transformer.wte.weight"]
    got = load_file(str(out / "model.safetensors"))
    a = align_vocabularies(en_tokenizer, de_tokenizer)
    emb_key = "transformer.wte.weight" if source == "gpt2-src" else "model.embed_tokens.weight"
    keys = [emb_key] + ([] if source == "gpt2-src" else ["lm_head.weight"])
    for key in keys:
        want, sums = clp_oracle(src[key], helper, a.target_ids, a.source_ids)
        missing = np.setdiff1d(np.arange(len(de_tokenizer)), a.target_ids)
        degenerate = missing[sums[missing] <= 0]
        assert len(degenerate) == 1  # the row built to point away from all shared tokens
        assert got[key].shape == (len(de_tokenizer), src[key].shape[1])
        np.testing.assert_array_equal(got[key][a.target_ids], src[key][a.source_ids])
        rel = np.abs(got[key] - want).max(axis=1) / np.abs(want).max(axis=1)
        assert rel.max() < 1e-5, key
    for key in src:
        if key not in keys:
            np.testing.assert_array_equal(got[key], src[key])  # every other tensor is the source's
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["overlap"] == len(a.target_ids) and report["missing"] == len(de_tokenizer) - len(a.target_ids)
    assert report["alignment"]["mode"] == "exact" and report["degenerate_rows"] == len(degenerate)
    assert report["degenerate_target_ids"] == degenerate.tolist()
    ids = torch.as_tensor([de_tokenizer("das haus ist klein")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("strategy", ["clp-topk", "clp-sparsemax", "random", "mean", "overlap", "from-scratch"])
def test_every_strategy_writes_a_loadable_model(dirs, tmp_path, capsys, strategy, de_tokenizer):
    out = tmp_path / strategy
    code, stdout, err = transfer(["--source", dirs / "llama-src", "--helper", dirs / "helper", "--out", out,
                                  "--strategy", strategy], capsys)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(de_tokenizer)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["strategy"] == strategy
    result = json.loads(stdout.strip().splitlines()[-1])  # rows copied from the source; tokens both vocabularies have
    assert result["overlap"] == report["overlap"] and (strategy != "from-scratch" or report["overlap"] == 0)
    assert result["shared_tokens"] == report["shared_tokens"] == report["alignment"]["overlap"] > 0
    positions = json.loads((dirs / "llama-src" / "config.json").read_text())["max_position_embeddings"]
    max_length = transformers.AutoTokenizer.from_pretrained(out).model_max_length
    assert max_length == positions != de_tokenizer.model_max_length
    src = load_file(str(dirs / "llama-src" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    layer = "model.layers.0.mlp.up_proj.weight"
    assert np.array_equal(got[layer], src[layer]) == (strategy != "from-scratch")


def test_sharding_does_not_change_the_result(dirs, tmp_path, capsys):
    outs = []
    for i, mesh in enumerate((["mesh.data=8", "mesh.fsdp=1"], ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"])):
        out = tmp_path / f"o{i}"
        code, _, err = transfer(["--source", dirs / "llama-src", "--helper", dirs / "helper", "--out", out,
                                 "--strategy", "clp", *mesh, "block_size=7"], capsys)
        assert code == 0, err
        outs.append(load_file(str(out / "model.safetensors")))
    for k in outs[0]:
        np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=1e-6, atol=1e-7)


def test_bad_input(dirs, tmp_path, capsys, de_tokenizer):
    lonely = Tokenizer(models.WordLevel({"qqq": 0, "zzz": 1, "[X]": 2}, unk_token="[X]"))
    lonely.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "lonely").mkdir()
    make_hf_model("gpt2", vocab_size=3, n_embd=16, n_head=2).save_pretrained(tmp_path / "lonely")
    transformers.PreTrainedTokenizerFast(tokenizer_object=lonely).save_pretrained(tmp_path / "lonely")
    make_hf_model("gpt2", vocab_size=len(de_tokenizer) - 5, n_embd=16, n_head=2).save_pretrained(tmp_path / "short")
    de_tokenizer.save_pretrained(tmp_path / "short")
    (tmp_path / "exists").mkdir()
    cases = [
        (["--helper", tmp_path / "lonely", "--out", tmp_path / "o1"], "CLP needs tokens shared"),
        (["--helper", tmp_path / "short", "--out", tmp_path / "o2"], "helper embedding has only"),
        (["--helper", dirs / "helper", "--out", tmp_path / "exists"], "exists (pass --overwrite"),
        (["--helper", dirs / "helper", "--out", tmp_path / "o3", "--strategy", "magic"], "strategy"),
    ]
    capsys.readouterr()
    for argv, fragment in cases:
        code, out, err = transfer(["--source", dirs / "gpt2-src", *argv], capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("clp-jax transfer: error:") and fragment in last, err
        assert "Traceback" not in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "lonely", "short"]
    code, _, err = transfer(["--source", dirs / "gpt2-src", "--helper", tmp_path / "lonely", "--out",
                             tmp_path / "o4", "--strategy", "random"], capsys)
    assert code == 0, err  # strategies without a helper work without shared tokens


def test_an_unwritable_output_fails_before_computing_and_write_errors_leave_nothing(dirs, tmp_path, capsys,
                                                                                   monkeypatch):
    import errno

    from clp_jax.hf import writer
    from clp_jax.transfer import run

    args = ["--source", dirs / "gpt2-src", "--helper-tokenizer", dirs / "helper", "--strategy", "random"]
    (tmp_path / "file").write_text("not a dir")
    (tmp_path / "ro").mkdir()
    real_mkdtemp, real_usage = tempfile.mkdtemp, shutil.disk_usage

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    def full(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(run, "transfer_params", lambda *a, **k: pytest.fail("computed before checking the output"))
    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # a read-only parent (root ignores chmod)
    code, out, err = transfer([*args, "--out", tmp_path / "ro" / "o"], capsys)
    assert code == 2 and out == "" and err.strip().splitlines() == [
        f"clp-jax transfer: error: {tmp_path / 'ro' / 'o'}: cannot write the output: Permission denied "
        f"({tmp_path / 'ro'}); nothing was written"], err
    monkeypatch.setattr(tempfile, "mkdtemp", real_mkdtemp)
    code, out, err = transfer([*args, "--out", tmp_path / "file" / "o"], capsys)
    assert code == 2 and "cannot write the output: File exists" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    code, out, err = transfer([*args, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"MiB but {tmp_path} has only 0.0 MiB free" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.undo()
    monkeypatch.setattr(writer, "write_json", full)  # the disk fills up while writing
    code, out, err = transfer([*args, "--out", tmp_path / "o"], capsys)
    assert code == 2 and out == "" and err.strip().splitlines()[-1] == (
        f"clp-jax transfer: error: {tmp_path / 'o'}: cannot write the output: No space left on device "
        f"({tmp_path / 'o' / 'config.json'}); nothing was written"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"]


def test_cross_style_transfer_uses_canonical_matching(dirs, tmp_path, capsys, en_tokenizer):
    """Byte-level source (GPT-2 style) -> SentencePiece-style helper (Llama style): matched by bytes."""
    from conftest import WORDS_DE, make_sentences
    from test_transfer_align import sentencepiece_bpe

    sp = sentencepiece_bpe(make_sentences(WORDS_DE, 300, seed=3))
    helper = tmp_path / "sp-helper"
    make_hf_model("llama-tied", vocab_size=len(sp), hidden_size=16, num_attention_heads=2,
                  num_key_value_heads=2).save_pretrained(helper)
    sp.save_pretrained(helper)
    out = tmp_path / "out"
    code, _, err = transfer(["--source", dirs / "gpt2-src", "--helper", helper, "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / "transfer_report.json").read_text())
    a = align_vocabularies(en_tokenizer, sp)
    assert report["alignment"]["mode"] == "canonical"
    assert report["alignment"]["source_style"] == "byte-level"
    assert report["alignment"]["target_style"] == "sentencepiece"
    assert report["overlap"] == len(a.target_ids) > len(align_vocabularies(en_tokenizer, sp, "exact").target_ids)
    src = load_file(str(dirs / "gpt2-src" / "model.safetensors"))["transformer.wte.weight"]
    got = load_file(str(out / "model.safetensors"))["transformer.wte.weight"]
    np.testing.assert_array_equal(got[a.target_ids], src[a.source_ids])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("das haus")["input_ids"] == sp("das haus")["input_ids"]


def triple(stats):
    return [stats["min"], stats["mean"], stats["max"]]


def norm_stats(rows):
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    return [norms.min(), norms.mean(), norms.max()]


def test_fvt_needs_no_helper_model_and_follows_the_source_tokenizer(dirs, tmp_path, capsys, en_tokenizer,
                                                                    de_tokenizer):
    """FVT (the default strategy) from a tokenizer-only target dir: each missing token = mean of its text's
    source-token rows."""
    de_tokenizer.save_pretrained(tmp_path / "de-tok")
    out = tmp_path / "out"
    code, _, err = transfer(["--source", dirs / "gpt2-src", "--helper-tokenizer", tmp_path / "de-tok", "--out", out],
                            capsys)
    assert code == 0, err
    src = load_file(str(dirs / "gpt2-src" / "model.safetensors"))["transformer.wte.weight"]
    got = load_file(str(out / "model.safetensors"))["transformer.wte.weight"].astype(np.float64)
    a = align_vocabularies(en_tokenizer, de_tokenizer)
    missing = np.setdiff1d(np.arange(len(de_tokenizer)), a.target_ids)
    checked = 0
    for i in missing:
        text = de_tokenizer.backend_tokenizer.decoder.decode([de_tokenizer.convert_ids_to_tokens(int(i))])
        if "\ufffd" in text:
            continue  # part of a character: test_transfer_align checks the single-byte pieces
        ids = en_tokenizer(text, add_special_tokens=False)["input_ids"]
        np.testing.assert_allclose(got[i], src[ids].astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked > 0.9 * len(missing)
    np.testing.assert_array_equal(got[a.target_ids], src[a.source_ids])
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["strategy"] == "fvt" and report["helper"] is None
    assert report["options"]["max_norm_factor"] == 1.5 and report["options"]["match_norms"] is False
    assert report["options"]["max_pieces"] >= 2 and report["degenerate_rows"] == 0
    assert report["ill_conditioned"]["counts"] == {"zero_helper": 0, "cos_sum": 0, "no_pieces": 0, "norm": 0}
    assert report["row_norms"]["matrices"] == ["embed/embedding"]
    np.testing.assert_allclose(triple(report["row_norms"]["source"][0]), norm_stats(src), rtol=1e-5)
    np.testing.assert_allclose(triple(report["row_norms"]["computed"][0]), norm_stats(got[missing]),
                               rtol=1e-5)


def test_omp_options_reach_the_transfer_and_the_report(dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = transfer(["--source", dirs / "llama-src", "--helper", dirs / "helper", "--out", out,
                             "--strategy", "omp", "omp_k=4", "center_helper=true", "match_norms=true",
                             "max_norm_factor=3"], capsys)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model.get_input_embeddings().weight).all()
    report = json.loads((out / "transfer_report.json").read_text())
    options = report["options"]
    assert (options["omp_k"], options["center_helper"], options["match_norms"], options["max_norm_factor"]) == (
        4, True, True, 3.0)
    assert report["row_norms"]["matrices"] == ["embed/embedding", "lm_head/kernel"]
    assert sum(report["ill_conditioned"]["counts"].values()) == report["degenerate_rows"]
    src = load_file(str(dirs / "llama-src" / "model.safetensors"))
    a = align_vocabularies(*(transformers.AutoTokenizer.from_pretrained(d) for d in (dirs / "llama-src",
                                                                                       dirs / "helper")))
    for key, computed in zip(("model.embed_tokens.weight", "lm_head.weight"), report["row_norms"]["computed"]):
        shared_mean = np.linalg.norm(src[key][a.source_ids].astype(np.float64), axis=1).mean()
        np.testing.assert_allclose([computed["min"], computed["max"]], [shared_mean] * 2, rtol=1e-4)


def test_helper_strategies_refuse_to_run_without_a_helper(dirs, tmp_path, capsys):
    for argv, fragment in ((["--strategy", "omp", "--helper-tokenizer", dirs / "helper"], "needs --helper"),
                           (["--strategy", "fvt"], "no target tokenizer")):
        code, out, err = transfer(["--source", dirs / "gpt2-src", "--out", tmp_path / "o", *argv], capsys)
        assert code == 2 and fragment in err.strip().splitlines()[-1] and out == "", err
    assert not (tmp_path / "o").exists()
