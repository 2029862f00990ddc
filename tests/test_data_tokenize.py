"""Tokenizing sources: ids equal the tokenizer's own per document, the bytes each token covers, and the on-disk
cache hits and misses."""

import numpy as np
import pytest
from conftest import WORDS_DE, WORDS_EN, make_sentences, train_byte_level_tokenizer, train_sentencepiece_tokenizer

from clp_jax.data.sources import Document, SourceConfig, read_source
from clp_jax.data.tokenize import cache_key, token_bytes, tokenize_source, tokenizer_fingerprint
from clp_jax.errors import ClpError

MULTIBYTE = ["Déjà vu à la fenêtre, ça coûte 3 €.", "Über die Straße fällt leichter Regen 😀 heute.",
             "the house is small 😀😀 and green", "naïve café", "", "ß", "😀", "a  b   ", "   "]


class CountingTokenizer:
    """Delegates everything to a tokenizer and counts the encoding calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture
def en_source(tmp_path):
    path = tmp_path / "en.txt"
    path.write_text("\n".join(make_sentences(WORDS_EN, 57, seed=3)) + "\n", encoding="utf-8")
    return read_source(SourceConfig(name="en-web", path=str(path), language="en"))


def test_ids_equal_the_tokenizers_own_output_per_document(en_source, en_tokenizer):
    out = tokenize_source(en_source, en_tokenizer, batch_size=10)
    assert out.tokens.dtype == np.int32 and out.offsets.dtype == np.int64
    assert len(out) == 57 and out.offsets[0] == 0 and out.offsets[-1] == len(out.tokens)
    for i, doc in enumerate(en_source.documents):
        expected = en_tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        assert out.document(i).tolist() == expected
    assert (out.name, out.language) == ("en-web", "en")
    assert (out.stats.documents, out.stats.tokens, out.stats.from_cache) == (57, len(out.tokens), False)
    assert out.summary().startswith(f"en-web (en): 57 documents, {len(out.tokens):,} tokens")
    same = tokenize_source(en_source, en_tokenizer, batch_size=1000)
    np.testing.assert_array_equal(same.tokens, out.tokens)


def test_no_special_tokens_are_added(en_tokenizer):
    out = tokenize_source(["the house", "a garden"], en_tokenizer)
    assert en_tokenizer.eos_token_id not in out.tokens.tolist()
    assert out.language == "und" and len(out) == 2


def test_cache_hit_skips_tokenization_and_gives_identical_arrays(tmp_path, en_source, en_tokenizer):
    counting = CountingTokenizer(en_tokenizer)
    first = tokenize_source(en_source, counting, cache_dir=tmp_path / "cache", batch_size=16)
    assert counting.calls == 4 and not first.stats.from_cache
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    key = cache_key([d.text for d in en_source.documents], en_tokenizer)
    assert files == [f"{key}.bytes.npy", f"{key}.offsets.npy", f"{key}.tokens.npy"]  # no temp files left behind
    second = tokenize_source(en_source, counting, cache_dir=tmp_path / "cache")
    assert counting.calls == 4 and second.stats.from_cache
    np.testing.assert_array_equal(second.tokens, first.tokens)
    np.testing.assert_array_equal(second.token_bytes, first.token_bytes)
    np.testing.assert_array_equal(second.offsets, first.offsets)
    assert second.stats.tokens == first.stats.tokens and "(from cache)" in second.summary()


def test_changed_content_or_tokenizer_misses_the_cache(tmp_path, en_source, en_tokenizer, de_tokenizer):
    cache = tmp_path / "cache"
    tokenize_source(en_source, en_tokenizer, cache_dir=cache)
    changed_docs = list(en_source.documents)
    changed_docs[5] = Document("en", "lm", text=changed_docs[5].text + " more")
    counting = CountingTokenizer(en_tokenizer)
    assert not tokenize_source(changed_docs, counting, cache_dir=cache).stats.from_cache and counting.calls == 1
    # the same texts split differently into documents are different content
    texts = [d.text for d in en_source.documents]
    merged = [texts[0] + texts[1], *texts[2:]]
    assert cache_key(merged, en_tokenizer) != cache_key(texts, en_tokenizer)

    other = CountingTokenizer(de_tokenizer)
    out = tokenize_source(en_source, other, cache_dir=cache)
    assert not out.stats.from_cache and other.calls == 1
    expected = de_tokenizer([d.text for d in en_source.documents], add_special_tokens=False)["input_ids"]
    assert [out.document(i).tolist() for i in range(len(out))] == expected

    extended = train_byte_level_tokenizer(make_sentences(WORDS_EN, 400))  # same vocabulary as en_tokenizer ...
    assert tokenizer_fingerprint(extended) == tokenizer_fingerprint(en_tokenizer)
    extended.add_tokens(["<|user|>"], special_tokens=True)  # ... until a token is added
    assert tokenizer_fingerprint(extended) != tokenizer_fingerprint(en_tokenizer)
    assert not tokenize_source(en_source, extended, cache_dir=cache).stats.from_cache
    assert len(list(cache.glob("*.tokens.npy"))) == 4


def test_a_corrupt_cache_entry_is_recomputed(tmp_path, en_source, en_tokenizer):
    cache = tmp_path / "cache"
    first = tokenize_source(en_source, en_tokenizer, cache_dir=cache)
    (offsets_file,) = cache.glob("*.offsets.npy")
    offsets_file.write_bytes(b"not an npy file")
    again = tokenize_source(en_source, en_tokenizer, cache_dir=cache)
    assert not again.stats.from_cache
    np.testing.assert_array_equal(again.tokens, first.tokens)
    assert tokenize_source(en_source, en_tokenizer, cache_dir=cache).stats.from_cache


def test_mixed_languages_and_pairs(en_tokenizer):
    docs = [Document("en", "lm", text="the house"), Document("de", "lm", text="das haus")]
    assert tokenize_source(docs, en_tokenizer).language == "mul"
    pairs = [Document("en", "sft", inputs="q", targets="a")]
    with pytest.raises(ClpError, match="prompt/response pairs"):
        tokenize_source(pairs, en_tokenizer)
    with pytest.raises(ClpError, match="batch_size"):
        tokenize_source(["x"], en_tokenizer, batch_size=0)


def test_german_source_with_german_tokenizer(tmp_path, de_tokenizer):
    path = tmp_path / "de.jsonl"
    path.write_text("".join(f'{{"text": "{s}"}}\n' for s in make_sentences(WORDS_DE, 20, seed=4)), encoding="utf-8")
    data = read_source(SourceConfig(name="de", path=str(path), language="de"))
    out = tokenize_source(data, de_tokenizer, batch_size=3)
    assert de_tokenizer.decode(out.tokens.tolist()) == "".join(d.text for d in data.documents)


def test_token_bytes_rule_on_hand_made_offsets():
    """Each token covers the bytes from the furthest span end before it to its own end; the last token the rest."""
    texts = ["h\u00e9llo w\u00f6rld", "\U0001F600x", "ab  ", "ab", "", "\u00e9t\u00e9"]
    offsets = [[(0, 0), (0, 1), (1, 2), (1, 2), (2, 5), (6, 11)],  # BOS, é as two byte tokens, a trimmed " wörld"
               [(0, 1), (0, 1), (0, 1), (0, 1), (1, 2)],  # an emoji as four byte-fallback tokens
               [(0, 1), (1, 2)],  # trailing spaces no span reaches
               [(0, 1), (1, 2), (0, 0)],  # EOS added by a post-processor
               [],
               [(0, 0), (0, 1), (0, 0), (1, 3)]]  # a special token in the middle
    got = token_bytes(texts, offsets)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [0, 1, 2, 0, 3, 7, 4, 0, 0, 0, 1, 1, 3, 1, 1, 0, 0, 2, 0, 3])
    assert got.sum() == sum(len(t.encode()) for t in texts)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_token_bytes_of_a_real_tokenizer_against_decoded_prefixes(kind):
    """Per document the bytes sum to the text's UTF-8 length, and at every token boundary where the decoded
    prefix is a prefix of the text (not inside a character), the running sum is that prefix's UTF-8 length.

    Not checked: an empty prefix (a bare '▁' first token, the space Metaspace prepends, shares the first
    character's span and so covers that character), and texts starting with a space (the decoder strips one)."""
    corpus = make_sentences(WORDS_EN, 300) + make_sentences(WORDS_DE, 300, seed=1)
    tok = (train_byte_level_tokenizer(corpus) if kind == "byte-level" else
           train_sentencepiece_tokenizer(corpus, bos=False))
    out = tokenize_source(MULTIBYTE, tok)
    checked = 0
    for i, text in enumerate(MULTIBYTE):
        ids, nbytes = out.document(i).tolist(), out.token_bytes[out.offsets[i]:out.offsets[i + 1]]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert nbytes.sum() == (len(text.encode()) if ids else 0) and np.all(nbytes >= 0)
        running = np.cumsum(nbytes)
        for k in range(1, len(ids) if not text.startswith(" ") else 0):
            prefix = tok.decode(ids[:k], clean_up_tokenization_spaces=False)
            if prefix and text.startswith(prefix):
                assert running[k - 1] == len(prefix.encode()), (text, k, prefix)
                checked += 1
    assert checked > 40, checked
