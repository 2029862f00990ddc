"""`clp-jax transfer` end to end: transformers loads the result; weights follow the CLP formula exactly."""

import json

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
    code, stdout, err = transfer(["--source", dirs / source, "--helper", dirs / "helper", "--out", out], capsys)
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
    code, _, err = transfer(["--source", dirs / "llama-src", "--helper", dirs / "helper", "--out", out,
                             "--strategy", strategy], capsys)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(de_tokenizer)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["strategy"] == strategy
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
