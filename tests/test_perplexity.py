"""Perplexity and bits per byte against transformers' PyTorch loss and the texts' UTF-8 bytes, in float64."""

import math

import numpy as np
import pytest
import torch
from conftest import (
    WORDS_DE,
    WORDS_EN,
    add_bos,
    make_sentences,
    train_byte_level_tokenizer,
    train_sentencepiece_tokenizer,
)
from hf_models import make_hf_model

from clp_jax.eval.perplexity import encode_documents, perplexity
from clp_jax.hf.reader import load_params
from clp_jax.sharding import make_mesh


def torch_reference(model, docs):
    """Token-weighted mean next-token cross-entropy, each document run alone (no padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.as_tensor(d[None].astype(np.int64))
            loss = model(input_ids=ids, labels=ids).loss.double().item()  # mean over len(d)-1 predictions
            total += loss * (len(d) - 1)
            count += len(d) - 1
    return total / count, count


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied", "bloom"])
def test_loss_matches_pytorch_and_ignores_batching(name, tmp_path, en_tokenizer):
    hf = make_hf_model(name, vocab_size=len(en_tokenizer))
    hf.save_pretrained(tmp_path)
    texts = make_sentences(WORDS_EN, 23, seed=5) + ["", "   ", "a"]
    docs, _, skipped = encode_documents(en_tokenizer, texts, seq_len=16)
    assert skipped == 1 and len(docs) == 23 and max(len(d) for d in docs) == 16
    ref_loss, ref_tokens = torch_reference(hf, docs)
    results = []
    for batch, mesh in ((1, make_mesh(data=1, fsdp=1, tensor=1, devices=[__import__("jax").devices()[0]])),
                        (5, make_mesh(data=-1)), (23, make_mesh(data=2, fsdp=2, tensor=2))):
        cfg, params = load_params(str(tmp_path), mesh, progress=False)
        results.append(perplexity(params, cfg, mesh, docs, batch_size=batch, seq_len=16, progress=False))
    for r in results:
        assert r.tokens == ref_tokens
        assert abs(r.loss - ref_loss) / ref_loss < 1e-5
        assert abs(r.ppl - np.exp(ref_loss)) / np.exp(ref_loss) < 1e-4
    assert max(r.loss for r in results) - min(r.loss for r in results) < 1e-6 * ref_loss


def test_encode_documents_uses_tokenizer_defaults(en_tokenizer):
    docs, covered, skipped = encode_documents(en_tokenizer, ["the house is small", "x"], seq_len=1024)
    assert skipped == 1
    assert docs[0].tolist() == en_tokenizer("the house is small")["input_ids"]
    first = en_tokenizer.decode(docs[0][:1])  # no BOS: the first token's text is not predicted
    assert covered.tolist() == [len("the house is small") - len(first)]


MULTIBYTE = ["Déjà vu à la fenêtre, ça coûte 3 €.", "Der Regen fällt über die Straße 😀 heute.",
             "The house is small 😀😀 and green.", "The naïve café au lait.", "Das Kind liest ein Buch über Bäume."]


def covered_bytes_oracle(tokenizer, text, seq_len, bos):
    """UTF-8 bytes of the text predicted tokens 1..n-1 cover, from the raw text (untruncated) or the decoded
    kept tokens (truncated; the cut must fall between characters), less the first token's text without BOS."""
    ids = tokenizer(text)["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) == bos
    kept = ids[:seq_len]
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    prefix = text if len(ids) <= seq_len else decode(kept)
    assert text.startswith(prefix) and prefix, (text, prefix)
    first = "" if bos else decode(kept[:1])
    assert first == text[:len(first)] and (bos or first), (text, first)  # a whole first token, not a bare '▁'
    return len(prefix.encode()) - len(first.encode())


@pytest.mark.parametrize("kind,bos", [("byte-level", False), ("byte-level", True), ("sentencepiece", True),
                                      ("sentencepiece", False)])
def test_bits_per_byte_matches_pytorch_and_raw_utf8_bytes(kind, bos, tmp_path):
    """bpb = summed PyTorch next-token loss / (ln 2 x bytes the predicted tokens cover), for byte-level BPE and a
    SentencePiece-style tokenizer (byte fallback), with and without BOS, accents and emoji, and truncation."""
    corpus = make_sentences(WORDS_EN, 300) + make_sentences(WORDS_DE, 300, seed=1)
    if kind == "byte-level":
        tok, model = train_byte_level_tokenizer(corpus, vocab_size=600), "gpt2"
        tok = add_bos(tok) if bos else tok
    else:
        tok, model = train_sentencepiece_tokenizer(corpus, bos=bos), "llama-tied"
    hf = make_hf_model(model, vocab_size=len(tok))
    hf.save_pretrained(tmp_path)
    seq_len = 48
    long = [f"{MULTIBYTE[s]} {' '.join(make_sentences(WORDS_EN, 9, seed=s))} Fenêtre 😀 über." for s in range(3)]
    texts = MULTIBYTE + make_sentences(WORDS_DE, 5, seed=8) + long
    docs, covered, skipped = encode_documents(tok, texts, seq_len=seq_len)
    assert skipped == 0 and len(docs) == len(texts)
    assert sum(len(tok(t)["input_ids"]) > seq_len for t in texts) == len(long)  # the long ones are truncated
    oracle = [covered_bytes_oracle(tok, t, seq_len, bos) for t in texts]
    assert covered.tolist() == oracle
    if bos:  # untruncated with BOS: all the text's bytes
        assert oracle[:len(MULTIBYTE)] == [len(t.encode()) for t in MULTIBYTE]
    loss, count = torch_reference(hf, docs)
    mesh = make_mesh(data=-1)
    cfg, params = load_params(str(tmp_path), mesh, progress=False)
    r = perplexity(params, cfg, mesh, docs, batch_size=5, seq_len=seq_len, covered_bytes=covered, progress=False)
    assert r.bytes == sum(oracle) and r.tokens == count
    ref_bpb = loss * count / (math.log(2) * sum(oracle))
    assert abs(r.bits_per_byte - ref_bpb) / ref_bpb < 1e-5
    assert r.to_dict()["bits_per_byte"] == r.bits_per_byte
    assert perplexity(params, cfg, mesh, docs, seq_len=seq_len, progress=False).bits_per_byte is None


def test_models_of_one_architecture_share_the_compiled_step_and_keep_their_own_loss(tmp_path, en_tokenizer):
    """The eval step is compiled once per (architecture, mesh, rows); each model's weights still give its loss."""
    from clp_jax.eval import perplexity as perplexity_module

    docs, _, _ = encode_documents(en_tokenizer, make_sentences(WORDS_EN, 9, seed=3), seq_len=16)
    mesh = make_mesh(data=-1)
    perplexity_module._document_step.cache_clear()  # other tests in this worker may have compiled this shape
    losses = []
    for seed in (0, 1):
        hf = make_hf_model("gpt2", seed=seed, vocab_size=len(en_tokenizer))
        hf.save_pretrained(tmp_path / str(seed))
        cfg, params = load_params(str(tmp_path / str(seed)), mesh, progress=False)
        before = perplexity_module._document_step.cache_info()
        got = perplexity(params, cfg, mesh, docs, batch_size=4, seq_len=16, progress=False)
        after = perplexity_module._document_step.cache_info()
        assert (after.hits - before.hits, after.misses - before.misses) == ((0, 1) if seed == 0 else (1, 0))
        losses.append(got.loss)
        assert got.loss == pytest.approx(torch_reference(hf, docs)[0], rel=1e-5)
    assert abs(losses[0] - losses[1]) > 1e-3
