"""Token alignment: style detection, canonical forms, exact/canonical matching and special tokens."""

import json
import random
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from clp_jax.transfer.align import (
    MODES,
    STYLES,
    VocabAlignment,
    align_vocabularies,
    canonical_token,
    fvt_pieces,
    tokenizer_style,
)

SHARED = "hand finger name warm wind winter arm ring bus hotel".split()
ENGLISH = SHARED + "the house is big small water good night we see garden running school green".split()
ENGLISH += "kitchen trees street girl beautiful over".split()
GERMAN = SHARED + "das haus ist groß klein wasser gut nacht wir sehen garten schön über mädchen grün".split()
GERMAN += "küche bäume straße möchten hören".split()
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(n))
    return [line.capitalize() + "." for line in lines]


ENGLISH_TEXT = sentences(ENGLISH, 300, seed=0)
GERMAN_TEXT = sentences(GERMAN, 300, seed=1)


def wrap(tokenizer: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def byte_level(text: list[str], vocab_size: int = 450) -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE with <|endoftext|> as bos, eos and unk."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    eot = "<|endoftext|>"
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eot], initial_alphabet=alphabet)
    tok.train_from_iterator(text, trainer)
    return wrap(tok, bos_token=eot, eos_token=eot, unk_token=eot)


SP_DECODER = decoders.Sequence(
    [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
)


def sentencepiece_bpe(text: list[str], vocab_size: int = 350, pad: bool = False) -> PreTrainedTokenizerFast:
    """Llama style: Metaspace BPE with byte fallback; <0xNN> pieces sit at ids 3..258 of the model vocab."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<unk>", "<s>", "</s>"]
    trained.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    spec = json.loads(trained.to_str())["model"]
    ordinary = sorted((i, t) for t, i in spec["vocab"].items() if i >= 3)
    vocab = {t: i for i, t in enumerate(specials + BYTES + [t for _, t in ordinary])}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = SP_DECODER
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad:
        tok.add_special_tokens(["<pad>"])
        special["pad_token"] = "<pad>"
    return wrap(tok, **special)


def sentencepiece_unigram(text: list[str]) -> PreTrainedTokenizerFast:
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>"], unk_token="<unk>")
    trained.train_from_iterator(text, trainer)
    scored = [(t, s) for t, s in json.loads(trained.to_str())["model"]["vocab"] if t != "<unk>"]
    pieces = [("<unk>", 0.0)] + [(b, 0.0) for b in BYTES] + scored
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = SP_DECODER
    return wrap(tok, unk_token="<unk>")


def llama_normalizer_style(text: list[str]) -> PreTrainedTokenizerFast:
    """Older Llama tokenizer.json: '▁' comes from the normalizer, no pre-tokenizer, no byte fallback."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    return wrap(tok, unk_token="<unk>")


def wordpiece(text: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    roles = {f"{role}_token": f"[{role.upper()}]" for role in ("pad", "unk", "cls", "sep", "mask")}
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=list(roles.values()))
    tok.train_from_iterator(text, trainer)
    return wrap(tok, **roles)


WORDPIECE_DECODER = decoders.WordPiece(prefix="##", cleanup=False)


def plain(text: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    return wrap(tok, unk_token="<unk>")


def text_of(tok: PreTrainedTokenizerFast, token: str) -> str:
    """The token's text per the tokenizer's own decoder, leading space kept (an anchor defeats Strip)."""
    prefix = tok.convert_tokens_to_string(["x"])
    full = tok.convert_tokens_to_string(["x", token])
    assert full.startswith(prefix)
    return full[len(prefix) :]


class VocabOnly:
    """A tokenizer without a backend: style detection must fall back to the vocabulary."""

    def __init__(self, tok: PreTrainedTokenizerFast):
        self.vocab = tok.get_vocab()

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    mixed = ENGLISH_TEXT + GERMAN_TEXT[:60]
    return {
        "bl_en": byte_level(mixed),
        "bl_de": byte_level(GERMAN_TEXT),
        "sp_de": sentencepiece_bpe(GERMAN_TEXT),
        "sp_en_pad": sentencepiece_bpe(mixed, pad=True),
        "wp_en": wordpiece(mixed),
        "wp_de": wordpiece(GERMAN_TEXT),
    }


def pairs_by_token(src, tgt, alignment: VocabAlignment) -> dict[str, str]:
    t_tokens = tgt.convert_ids_to_tokens(alignment.target_ids.tolist())
    s_tokens = src.convert_ids_to_tokens(alignment.source_ids.tolist())
    return dict(zip(t_tokens, s_tokens, strict=True))


def test_tokenizer_style_from_backend(toks):
    assert tokenizer_style(toks["bl_en"]) == "byte-level"
    assert tokenizer_style(toks["sp_de"]) == "sentencepiece"
    assert tokenizer_style(sentencepiece_unigram(GERMAN_TEXT)) == "sentencepiece"
    assert tokenizer_style(llama_normalizer_style(GERMAN_TEXT)) == "sentencepiece"
    assert tokenizer_style(toks["wp_en"]) == "wordpiece"
    assert tokenizer_style(plain(ENGLISH_TEXT)) == "plain"
    assert set(STYLES) == {"byte-level", "sentencepiece", "wordpiece", "plain"}


def test_tokenizer_style_from_vocab_fallback(toks):
    assert tokenizer_style(VocabOnly(toks["bl_en"])) == "byte-level"
    assert tokenizer_style(VocabOnly(toks["sp_de"])) == "sentencepiece"
    assert tokenizer_style(VocabOnly(toks["wp_en"])) == "wordpiece"
    assert tokenizer_style(VocabOnly(plain(ENGLISH_TEXT))) == "plain"


def test_canonical_token_hand_checked():
    assert canonical_token("Ġhello", "byte-level") == b" hello"
    assert canonical_token("Ã¤", "byte-level") == "ä".encode()
    assert canonical_token("Ċ", "byte-level") == b"\n"
    assert canonical_token("Ã", "byte-level") == b"\xc3"
    assert canonical_token("€", "byte-level") is None  # not in the byte alphabet
    assert canonical_token("▁hello", "sentencepiece") == b" hello"
    assert canonical_token("hello", "sentencepiece") == b"hello"
    assert canonical_token("<0xC3>", "sentencepiece") == b"\xc3"
    assert canonical_token("<0x0A>", "sentencepiece") == b"\n"
    assert canonical_token("##ing", "wordpiece") == b"ing"
    assert canonical_token("the", "wordpiece") == b" the"
    assert canonical_token("schön", "plain") == "schön".encode()
    assert canonical_token("", "plain") is None
    with pytest.raises(ValueError, match="byte-level"):
        canonical_token("x", "bpe")


def test_canonical_byte_level_inverts_the_pre_tokenizer(toks):
    encode = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for word in set(ENGLISH + GERMAN):
        for text in (word, " " + word, word.capitalize() + ".\n"):
            ((mapped, _),) = encode.pre_tokenize_str(text)
            assert canonical_token(mapped, "byte-level") == text.encode()
    non_ascii = 0
    for token in toks["bl_de"].get_vocab():
        key = canonical_token(token, "byte-level")
        assert key is not None
        non_ascii += not key.isascii()
        try:
            expected = key.decode()
        except UnicodeDecodeError:
            continue
        assert text_of(toks["bl_de"], token) == expected
    assert non_ascii > 100


def test_canonical_sentencepiece_and_wordpiece_match_their_decoders(toks):
    for name, style in (("sp_de", "sentencepiece"), ("wp_de", "wordpiece")):
        tok = toks[name]
        checked = 0
        for token, token_id in tok.get_vocab().items():
            if token_id in tok.all_special_ids or token.startswith("<0x"):
                continue
            key = canonical_token(token, style)
            if style == "wordpiece":
                # The WordPiece decoder puts a space before a word start unless it is the first token.
                assert WORDPIECE_DECODER.decode(["x", token]) == "x" + key.decode()
            else:
                assert text_of(tok, token) == key.decode()
            checked += 1
        assert checked > 100


def test_exact_mode_is_the_string_intersection(toks):
    src, tgt = toks["bl_en"], toks["bl_de"]
    alignment = align_vocabularies(src, tgt)
    assert alignment.mode == "exact"
    assert (alignment.source_style, alignment.target_style) == ("byte-level", "byte-level")
    shared = set(src.get_vocab()) & set(tgt.get_vocab())
    by_token = pairs_by_token(src, tgt, alignment)
    assert set(by_token) == shared
    assert all(t == s for t, s in by_token.items())
    assert alignment.target_ids.dtype == np.int64 and alignment.source_ids.dtype == np.int64
    assert np.all(np.diff(alignment.target_ids) > 0)
    assert "Ġhand" in shared and "Ġgroß" not in src.get_vocab()
    assert align_vocabularies(src, tgt, mode="exact").target_ids.tolist() == alignment.target_ids.tolist()


def test_canonical_mode_matches_across_styles(toks):
    src, tgt = toks["bl_en"], toks["sp_de"]
    alignment = align_vocabularies(src, tgt)
    assert alignment.mode == "canonical"
    assert (alignment.source_style, alignment.target_style) == ("byte-level", "sentencepiece")
    exact = align_vocabularies(src, tgt, mode="exact")
    assert alignment.target_ids.size > 3 * exact.target_ids.size
    assert len(set(alignment.target_ids.tolist())) == alignment.target_ids.size

    by_token = pairs_by_token(src, tgt, alignment)
    compared = 0
    for t_token, s_token in by_token.items():
        if t_token in tgt.all_special_tokens:
            continue
        if t_token.startswith("<0x"):  # one byte: decoders print U+FFFD, so compare the byte-level char
            assert canonical_token(s_token, "byte-level") == bytes([int(t_token[3:5], 16)])
            continue
        assert text_of(tgt, t_token) == text_of(src, s_token)
        compared += 1
    assert compared > 50

    src_vocab, tgt_vocab = src.get_vocab(), tgt.get_vocab()
    for word in SHARED:
        if "Ġ" + word in src_vocab and "▁" + word in tgt_vocab:
            assert by_token["▁" + word] == "Ġ" + word
    assert by_token["▁hand"] == "Ġhand"
    assert by_token["<0xC3>"] == "Ã" and by_token["<0x0A>"] == "Ċ"
    assert by_token["ä"] == "Ã¤"


def test_tie_breaking_between_source_candidates(toks):
    # Source sentencepiece: 'a' and '<0x61>' share b"a"; '▁' and '<0x20>' share b" ".
    src, tgt = toks["sp_de"], toks["bl_en"]
    by_token = pairs_by_token(src, tgt, align_vocabularies(src, tgt))
    assert by_token["a"] == "a"  # the identical string wins
    assert by_token["Ġ"] == "▁"  # an ordinary piece beats a byte-fallback piece
    assert by_token["{"] == "<0x7B>"  # only candidate
    # Source byte-level with an added (read as plain) 'ön' beside the model's 'Ã¶n': both are b"\xc3\xb6n".
    src = byte_level(ENGLISH_TEXT + GERMAN_TEXT[:60])
    assert "ön" not in src.get_vocab()
    src.add_tokens(["ön"])
    assert src.convert_tokens_to_ids("Ã¶n") < src.convert_tokens_to_ids("ön")
    by_token = pairs_by_token(src, toks["wp_de"], align_vocabularies(src, toks["wp_de"]))
    assert by_token["##ön"] == "Ã¶n"  # no identical string: the lowest id wins
    assert pairs_by_token(src, toks["sp_de"], align_vocabularies(src, toks["sp_de"]))["ön"] == "ön"


def test_special_tokens_are_matched_by_role(toks):
    src, tgt = toks["bl_en"], toks["sp_de"]
    alignment = align_vocabularies(src, tgt)
    eot = src.convert_tokens_to_ids("<|endoftext|>")
    pairs = dict(zip(alignment.target_ids.tolist(), alignment.source_ids.tolist(), strict=True))
    for role, token in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>")):
        entry = alignment.special[role]
        assert entry["target_token"] == token and entry["source_token"] == "<|endoftext|>"
        assert pairs[tgt.convert_tokens_to_ids(token)] == eot == entry["source_id"]
    assert "pad" not in alignment.special

    # The other way round one target id serves bos, eos and unk: it appears once, mapped to eos.
    back = align_vocabularies(tgt, src)
    assert back.target_ids.tolist().count(eot) == 1
    assert dict(zip(back.target_ids.tolist(), back.source_ids.tolist(), strict=True))[eot] == tgt.eos_token_id
    assert back.special["eos"]["applied"] and not back.special["bos"]["applied"]


def test_a_special_of_the_same_string_wins_over_the_role_match(toks):
    """SmolLM2-like source: <|endoftext|> is special, but eos is <|im_end|>; the target's <|endoftext|> (its eos)
    takes the source's <|endoftext|>."""
    src = byte_level(ENGLISH_TEXT)
    src.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    src.bos_token, src.eos_token = "<|im_start|>", "<|im_end|>"
    tgt = toks["bl_de"]
    alignment = align_vocabularies(src, tgt)
    pairs = dict(zip(alignment.target_ids.tolist(), alignment.source_ids.tolist(), strict=True))
    eot = src.convert_tokens_to_ids("<|endoftext|>")
    assert pairs[tgt.eos_token_id] == eot != src.eos_token_id
    entry = alignment.special["eos"]
    assert entry["source_token"] == "<|endoftext|>" and entry["source_id"] == eot
    assert entry["matched_by"] == "string" and entry["applied"]
    back = align_vocabularies(tgt, src)  # the other way: <|im_end|> has no same-string special, so eos by role
    assert back.special["eos"]["matched_by"] == "role" and back.special["eos"]["source_token"] == "<|endoftext|>"


def test_special_tokens_never_match_ordinary_tokens(toks):
    src = byte_level(ENGLISH_TEXT)
    src.add_tokens(["<s>", "</s>", "<pad>"])  # ordinary tokens spelled like the target's specials
    tgt = toks["sp_en_pad"]
    for mode in ("exact", "canonical"):
        alignment = align_vocabularies(src, tgt, mode=mode)
        pairs = dict(zip(alignment.target_ids.tolist(), alignment.source_ids.tolist(), strict=True))
        assert pairs[tgt.bos_token_id] == pairs[tgt.eos_token_id] == src.eos_token_id
        assert tgt.pad_token_id not in pairs  # the source has no pad role; its ordinary '<pad>' is no match
    back = align_vocabularies(tgt, src)  # the target's ordinary '<pad>' must not take the source's special
    assert src.convert_tokens_to_ids("<pad>") not in back.target_ids.tolist()
    # Specials without a role (BERT's [CLS], [SEP], [MASK]) match specials of the same string.
    wp = pairs_by_token(toks["wp_en"], toks["wp_de"], align_vocabularies(toks["wp_en"], toks["wp_de"]))
    assert all(wp[t] == t for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"))


def test_unknown_mode_lists_valid_modes(toks):
    with pytest.raises(ValueError, match="auto, exact, canonical"):
        align_vocabularies(toks["bl_en"], toks["bl_de"], mode="fuzzy")
    assert MODES == ("auto", "exact", "canonical")


def test_report_is_json_with_counts(toks):
    alignment = align_vocabularies(toks["bl_en"], toks["sp_de"])
    report = json.loads(json.dumps(alignment.to_report()))
    assert report["overlap"] == alignment.target_ids.size
    assert report["missing"] == len(toks["sp_de"]) - alignment.target_ids.size
    assert report["target_vocab_size"] == len(toks["sp_de"])
    assert report["source_vocab_size"] == len(toks["bl_en"])
    assert report["mode"] == "canonical" and report["target_style"] == "sentencepiece"
    assert report["special"]["eos"]["source_token"] == "<|endoftext|>"


def test_fvt_pieces_encode_each_target_text_with_the_source_tokenizer():
    """Byte-level source, SentencePiece target: '▁' becomes a space, <0xNN> the source's byte token."""
    source, target = byte_level(ENGLISH_TEXT), sentencepiece_bpe(GERMAN_TEXT)
    vocab = len(target) + 2  # rows past the tokenizer (a padded helper embedding) get no pieces
    pieces = fvt_pieces(source, target, vocab)
    assert pieces.shape[0] == vocab and (pieces[len(target):] == -1).all()

    def row(token):
        ids = pieces[target.convert_tokens_to_ids(token)]
        return ids[ids >= 0].tolist()

    checked = 0
    for token, i in target.get_vocab().items():
        if i in target.all_special_ids:
            assert row(token) == []
        elif not re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            assert row(token) == source.encode(token.replace("\u2581", " "), add_special_tokens=False), token
            checked += 1
    assert checked > 50
    for char in "üößä":  # two bytes each, unseen in English: the source spells them byte by byte
        first, second = (f"<0x{b:02X}>" for b in char.encode())
        assert row(first) + row(second) == source.encode(char, add_special_tokens=False)
    assert row("<0x41>") == source.encode("A", add_special_tokens=False)
    a = align_vocabularies(source, target)
    skipped = fvt_pieces(source, target, vocab, skip=a.target_ids)
    assert (skipped[a.target_ids] == -1).all()
    missing = np.setdiff1d(np.arange(vocab), a.target_ids)
    np.testing.assert_array_equal(skipped[missing, : pieces.shape[1]], pieces[missing])


def test_fvt_pieces_drop_a_sentencepiece_source_dummy_prefix():
    """SentencePiece source: a word-internal target token must not gain the tokenizer's leading '▁' piece."""
    source, target = sentencepiece_bpe(ENGLISH_TEXT), byte_level(GERMAN_TEXT)
    pieces = fvt_pieces(source, target, len(target))

    def spelled(ids):
        out = b""
        for token in source.convert_ids_to_tokens(ids):
            byte = re.fullmatch(r"<0x([0-9A-F]{2})>", token)
            out += bytes([int(byte.group(1), 16)]) if byte else token.replace("\u2581", " ").encode()
        return out

    checked = 0
    for token, i in target.get_vocab().items():
        if i in target.all_special_ids:
            continue
        text = target.backend_tokenizer.decoder.decode([token]).encode()
        if "\ufffd" in text.decode():
            continue
        got = spelled(pieces[i][pieces[i] >= 0].tolist())
        assert got == text, token
        checked += 1
    assert checked > 200
