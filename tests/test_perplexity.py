"""Perplexity against transformers' PyTorch loss, per document, in float64."""

import numpy as np
import pytest
import torch
from conftest import WORDS_EN, make_sentences
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
    docs, skipped = encode_documents(en_tokenizer, texts, seq_len=16)
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
    docs, skipped = encode_documents(en_tokenizer, ["the house is small", "x"], seq_len=1024)
    assert skipped == 1
    assert docs[0].tolist() == en_tokenizer("the house is small")["input_ids"]
