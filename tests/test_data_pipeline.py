"""From a data config to batches: text + JSONL sources, cache, held-out eval documents, report, errors."""

import json

import numpy as np
import pydantic
import pytest
from conftest import WORDS_DE, WORDS_EN, make_sentences

from clp_jax.data.mixtures import MixtureConfig
from clp_jax.data.pipeline import DataConfig, build_data, holdout_mask
from clp_jax.data.sources import SourceConfig
from clp_jax.errors import ClpError


def unique(texts):
    return list(dict.fromkeys(texts))


@pytest.fixture()
def corpus(tmp_path):
    en = unique(make_sentences(WORDS_EN, 160, seed=3))
    de = unique(make_sentences(WORDS_DE, 90, seed=4))
    (tmp_path / "en.txt").write_bytes("\n".join(en).encode() + b"\n\xff\xfe broken line\n")
    with open(tmp_path / "de.jsonl", "w", encoding="utf-8") as f:
        for text in de:
            f.write(json.dumps({"text": text, "language": "de"}) + "\n")
    sources = [SourceConfig(name="en", path=str(tmp_path / "en.txt"), language="en"),
               SourceConfig(name="de", path=str(tmp_path / "de.jsonl"))]
    return {"en": en, "de": de, "sources": sources, "dir": tmp_path}


def config(corpus, **kw):
    settings = {"sources": corpus["sources"], "seq_len": 64, "batch_size": 8, "eval_documents": 10,
                "cache_dir": str(corpus["dir"] / "cache"),
                "mixture": MixtureConfig(kind="explicit", weights={"en": 0.7, "de": 0.3})} | kw
    return DataConfig(**settings)


def segment_texts(tokenizer, rows):
    """The text of every document segment in packed rows (EOS dropped)."""
    out = []
    for tokens, segments in zip(rows["tokens"], rows["segment_ids"]):
        for s in range(1, segments.max() + 1):
            ids = [t for t in tokens[segments == s].tolist() if t != tokenizer.eos_token_id]
            out.append(tokenizer.decode(ids))
    return out


def test_pretrain_batches_report_and_cache(corpus, en_tokenizer):
    data = build_data(config(corpus), en_tokenizer, steps=50, process_index=0, process_count=1)
    batch = next(data.train)
    assert set(batch) == {"tokens", "segment_ids", "positions"} and batch["tokens"].shape == (8, 64)
    report = json.loads(json.dumps(data.report()))
    en, de = report["sources"]
    assert (en["documents"], en["skipped"], en["eval_documents"]) == (len(corpus["en"]), 1, 10)
    assert (de["documents"], de["language"], de["eval_documents"]) == (len(corpus["de"]), "de", 10)
    assert (en["share"], de["share"]) == pytest.approx((0.7, 0.3))
    assert en["expected_epochs"] == pytest.approx(50 * 8 * 0.7 / en["rows"])
    assert en["size"] == en["tokens"] > 0 and report["unit"] == "tokens" and report["epochs_from"] == "steps"
    assert report["mixture"]["sources"][0]["share"] == pytest.approx(0.7)
    table = data.format_report()
    assert "70.00%" in table and "30.00%" in table and "explicit" in table
    assert not en["from_cache"]
    again = build_data(config(corpus), en_tokenizer, steps=50, process_index=0, process_count=1)
    assert all(s["from_cache"] for s in again.report()["sources"])
    assert all(np.array_equal(a, b) for a, b in zip(batch.values(), next(again.train).values()))


def test_held_out_documents_never_reach_training(corpus, en_tokenizer):
    data = build_data(config(corpus, seq_len=256), en_tokenizer, process_index=0, process_count=1)
    for name in ("en", "de"):  # rows longer than any document: every segment is a whole document
        train = segment_texts(en_tokenizer, data.train.tables[name])
        held = segment_texts(en_tokenizer, data.eval_sets[name])
        assert len(held) == 10 and not set(train) & set(held)
        assert sorted(train + held) == sorted(corpus[name])
        batches = list(data.eval_batches(name, batch_size=4))
        assert len(batches) == -(-len(data.eval_sets[name]["tokens"]) // 4)
        assert sorted(t for b in batches for t in segment_texts(en_tokenizer, b)) == sorted(held)


def test_no_eval_documents_means_empty_eval_sets(corpus, en_tokenizer):
    data = build_data(config(corpus, eval_documents=0), en_tokenizer, process_index=0, process_count=1)
    assert all(len(rows["tokens"]) == 0 for rows in data.eval_sets.values())
    assert list(data.eval_batches("en")) == []
    assert sum(s["documents"] for s in data.report()["sources"]) == len(corpus["en"]) + len(corpus["de"])


def test_report_shows_a_unimax_budget_beyond_every_cap_as_leftover(corpus, en_tokenizer):
    mixture = MixtureConfig(kind="unimax", budget=1e9, max_epochs=2)
    data = build_data(config(corpus, mixture=mixture), en_tokenizer, process_index=0, process_count=1)
    tokens = {s["name"]: s["tokens"] for s in data.report()["sources"]}
    leftover = 1e9 - 2 * sum(tokens.values())
    assert data.mixture.leftover == pytest.approx(leftover)
    assert data.report()["mixture"]["leftover"] == pytest.approx(leftover)
    assert all(e == pytest.approx(2) for e in data.expected_epochs().values())
    assert f"leftover budget not drawn (every source at its epoch cap): {leftover:,.0f} tokens" in data.format_report()


def test_holdout_depends_on_texts_not_order():
    texts = [f"document {i}" for i in range(50)] + ["document 3"]
    mask = holdout_mask(texts, 5)
    assert sorted(np.array(texts)[mask].tolist()) == sorted(np.array(texts[::-1])[holdout_mask(texts[::-1], 5)])
    assert mask[3] == mask[-1], "a duplicate of a held-out text is held out too"
    assert len(set(np.array(texts)[mask])) == 5


def test_hosts_split_train_and_eval_batches(corpus, en_tokenizer):
    cfg = config(corpus)
    single = build_data(cfg, en_tokenizer, process_index=0, process_count=1)
    hosts = [build_data(cfg, en_tokenizer, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        whole, parts = next(single.train), [next(h.train) for h in hosts]
        assert all(p["tokens"].shape == (4, 64) for p in parts)
        assert np.array_equal(np.concatenate([p["tokens"] for p in parts]), whole["tokens"])
    whole = next(single.eval_batches("de"))
    parts = [next(h.eval_batches("de")) for h in hosts]
    assert np.array_equal(np.concatenate([p["segment_ids"] for p in parts]), whole["segment_ids"])


def test_sft_rows_carry_loss_weights_and_mix_by_examples(tmp_path, en_tokenizer):
    sources = []
    for lang, words, n in (("en", WORDS_EN, 40), ("de", WORDS_DE, 30)):
        path = tmp_path / f"{lang}.jsonl"
        prompts, answers = make_sentences(words, n, seed=5), make_sentences(words, n, seed=6)
        path.write_text("".join(json.dumps({"inputs": p, "targets": a, "language": lang}) + "\n"
                                for p, a in zip(prompts, answers)), encoding="utf-8")
        sources.append(SourceConfig(name=lang, path=str(path), task="sft"))
    mixture = MixtureConfig(kind="english_plus_n", english_budget=20, per_language=10, languages=["de"])
    cfg = DataConfig(sources=sources, mixture=mixture, mode="sft", seq_len=48, batch_size=4, eval_documents=5)
    data = build_data(cfg, en_tokenizer, process_index=0, process_count=1)
    batch = next(data.train)
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_weights"}
    assert batch["loss_weights"].shape == (4, 48) and batch["loss_weights"].sum() > 0
    report = data.report()
    assert report["unit"] == "examples" and [s["size"] for s in report["sources"]] == [35, 25]
    assert [s["share"] for s in report["sources"]] == pytest.approx([2 / 3, 1 / 3])
    assert [s["expected_epochs"] for s in report["sources"]] == pytest.approx([20 / 35, 10 / 25])
    assert len(data.eval_sets["de"]["tokens"]) == 5


def test_input_errors_come_before_training(corpus, en_tokenizer, tmp_path):
    missing = [SourceConfig(name="en", path=str(tmp_path / "nowhere.txt"), language="en")]
    zero = MixtureConfig(kind="explicit", weights={"en": 0.0})
    with pytest.raises(ClpError, match="all mixture weights are zero"):  # before reading the (missing) file
        build_data(DataConfig(sources=missing, mixture=zero), en_tokenizer, process_index=0, process_count=1)
    fr = SourceConfig(name="fr", path=str(corpus["dir"] / "de.jsonl"), language="fr")
    with pytest.raises(ClpError, match="no documents in language 'fr'"):
        build_data(config(corpus, sources=[fr], mixture=MixtureConfig(kind="temperature")), en_tokenizer,
                   process_index=0, process_count=1)
    with pytest.raises(ClpError, match="unknown sources: fr"):
        build_data(config(corpus, mixture=MixtureConfig(kind="explicit", weights={"en": 1, "de": 0, "fr": 1})),
                   en_tokenizer, process_index=0, process_count=1)
    with pytest.raises(ClpError, match="leaves none for training"):
        build_data(config(corpus, eval_documents=1000), en_tokenizer, process_index=0, process_count=1)
    with pytest.raises(ClpError, match="multiple of the 3 processes"):
        build_data(config(corpus), en_tokenizer, process_index=0, process_count=3)
    with pytest.raises(pydantic.ValidationError, match="mode 'sft' needs sources of prompt/response pairs"):
        config(corpus, mode="sft")
    with pytest.raises(pydantic.ValidationError, match="unique"):
        config(corpus, sources=corpus["sources"] * 2)
