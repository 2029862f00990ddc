"""Token alignment between a source tokenizer and a target (helper) tokenizer.

Tokens are matched by exact string when both tokenizers share a style, and by canonical
UTF-8 bytes (with b" " marking a word start) across styles. Special tokens are matched by identical string,
else by role.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

STYLES = ("byte-level", "sentencepiece", "wordpiece", "plain")
MODES = ("auto", "exact", "canonical")
# Earlier roles win when one target id serves several roles (GPT-2's <|endoftext|> is bos, eos and unk).
SPECIAL_ROLES = ("eos", "bos", "pad", "unk")

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SP_SPACE = "\u2581"


@cache
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table: printable Latin-1 bytes map to themselves,
    the remaining bytes to code points 256, 257, ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in printable)
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def canonical_token(token: str, style: str) -> bytes | None:
    """The token's text as UTF-8 bytes, starting with b" " when it starts a word; None if it has none."""
    if not token:
        return None
    if style == "byte-level":
        table = _byte_level_decoder()
        if any(ch not in table for ch in token):
            return None
        return bytes(table[ch] for ch in token)
    if style == "sentencepiece":
        byte = _BYTE_FALLBACK.fullmatch(token)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return token.replace(_SP_SPACE, " ").encode()
    if style == "wordpiece":
        if token.startswith("##") and len(token) > 2:
            return token[2:].encode()
        return b" " + token.encode()
    if style == "plain":
        return token.encode()
    raise ValueError(f"unknown tokenizer style {style!r}; expected one of {', '.join(STYLES)}")


def _component_types(node: Any) -> set[str]:
    """All "type" values in a tokenizer.json component, including those nested in Sequences."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        for value in node.values():
            found |= _component_types(value)
        return found
    if isinstance(node, list):
        return set().union(*(_component_types(item) for item in node))
    return set()


def _style_from_vocab(vocab: dict[str, int]) -> str:
    """Guess the style from word-boundary markers: the most frequent marker on at least 5% of tokens."""
    counts = {
        "byte-level": sum(tok.startswith("Ġ") for tok in vocab),
        "sentencepiece": sum(tok.startswith(_SP_SPACE) for tok in vocab),
        "wordpiece": sum(tok.startswith("##") for tok in vocab),
    }
    style, count = max(counts.items(), key=lambda item: item[1])
    return style if vocab and count >= 0.05 * len(vocab) else "plain"


def tokenizer_style(tok: Any) -> str:
    """Detect the tokenizer's style from its backend (model, normalizer, pre-tokenizer, decoder),
    falling back to word-boundary markers in the vocabulary."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return _style_from_vocab(tok.get_vocab())
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    text_parts = [spec.get(key) for key in ("normalizer", "pre_tokenizer", "decoder")]
    types = _component_types(text_parts)
    if model.get("type") == "WordPiece":
        return "wordpiece"
    if "ByteLevel" in types:
        return "byte-level"
    marks_spaces = _SP_SPACE in json.dumps(text_parts, ensure_ascii=False)  # e.g. Llama's Replace(" ", "▁")
    if "Metaspace" in types or model.get("byte_fallback") or marks_spaces:
        return "sentencepiece"
    if "WordPiece" in types:
        return "wordpiece"
    return _style_from_vocab(tok.get_vocab())


def _special_ids(tok: Any) -> set[int]:
    """Ids of every special token: the role tokens plus added tokens flagged special."""
    ids = {int(i) for i in tok.all_special_ids}
    for token_id, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def _keys(tok: Any, style: str, mode: str, specials: set[int]) -> dict[int, bytes | str]:
    """Matching key of every ordinary token: its string (exact) or canonical bytes (canonical).

    Added (non-special) tokens hold raw text rather than the model's encoding, so they are read as plain.
    """
    added = {int(i) for i in getattr(tok, "added_tokens_decoder", {})}
    keys: dict[int, bytes | str] = {}
    for token, token_id in tok.get_vocab().items():
        if token_id in specials:
            continue
        if mode == "exact":
            keys[token_id] = token
            continue
        key = canonical_token(token, "plain" if token_id in added else style)
        if key is not None:
            keys[token_id] = key
    return keys


@dataclass(frozen=True, eq=False)
class VocabAlignment:
    """Target (helper) token ids paired with the source ids whose embeddings they copy."""

    target_ids: np.ndarray
    source_ids: np.ndarray
    mode: str
    source_style: str
    target_style: str
    special: dict[str, dict]
    target_vocab_size: int
    source_vocab_size: int

    def to_report(self) -> dict:
        """A JSON-friendly summary: overlap counts, mode, styles and the special-token mapping."""
        overlap = int(self.target_ids.size)
        return {
            "mode": self.mode,
            "source_style": self.source_style,
            "target_style": self.target_style,
            "source_vocab_size": int(self.source_vocab_size),
            "target_vocab_size": int(self.target_vocab_size),
            "overlap": overlap,
            "missing": int(self.target_vocab_size) - overlap,
            "overlap_fraction": overlap / self.target_vocab_size if self.target_vocab_size else 0.0,
            "special": {role: dict(entry) for role, entry in self.special.items()},
        }


def _match_specials(source_tok: Any, target_tok: Any, same_string: dict[int, int]
                    ) -> tuple[dict[str, dict], dict[int, int]]:
    """Pair bos/eos/pad/unk: a target special that is also a source special of the same string (``same_string``,
    target id -> source id) keeps that source id, others take the source's token of the same role; a target id
    used by several roles takes the earliest role's pair."""
    special: dict[str, dict] = {}
    pairs: dict[int, int] = {}
    for role in SPECIAL_ROLES:
        target_id = getattr(target_tok, f"{role}_token_id", None)
        source_id = getattr(source_tok, f"{role}_token_id", None)
        if target_id is None or (source_id is None and target_id not in same_string):
            continue
        matched_by = "string" if target_id in same_string else "role"
        source_id = same_string.get(target_id, source_id)
        applied = target_id not in pairs
        if applied:
            pairs[int(target_id)] = int(source_id)
        special[role] = {
            "target_token": getattr(target_tok, f"{role}_token"),
            "target_id": int(target_id),
            "source_token": source_tok.convert_ids_to_tokens(int(source_id)),
            "source_id": int(source_id),
            "matched_by": matched_by,
            "applied": applied,
        }
    return special, pairs


def align_vocabularies(source_tok: Any, target_tok: Any, mode: str = "auto") -> VocabAlignment:
    """Pair every target token that has a source counterpart; mode is "auto", "exact" or "canonical".

    Several source tokens can share a canonical key (e.g. 'A' and '<0x41>'); the winner is the one whose
    string equals the target token, else a non-byte-fallback token, else the lowest id. A special token takes the
    source special of the identical string, else the source's token of its role (bos/eos/pad/unk); never an
    ordinary token.
    """
    if mode not in MODES:
        raise ValueError(f"unknown alignment mode {mode!r}; expected one of {', '.join(MODES)}")
    source_style, target_style = tokenizer_style(source_tok), tokenizer_style(target_tok)
    if mode == "auto":
        mode = "exact" if source_style == target_style else "canonical"

    source_vocab, target_vocab = source_tok.get_vocab(), target_tok.get_vocab()
    source_tokens = {token_id: token for token, token_id in source_vocab.items()}
    target_tokens = {token_id: token for token, token_id in target_vocab.items()}
    byte_fallback = set()
    if source_style == "sentencepiece":
        byte_fallback = {s for s, token in source_tokens.items() if _BYTE_FALLBACK.fullmatch(token)}
    source_specials, target_specials = _special_ids(source_tok), _special_ids(target_tok)

    candidates: dict[bytes | str, list[int]] = {}
    for source_id, key in _keys(source_tok, source_style, mode, source_specials).items():
        candidates.setdefault(key, []).append(source_id)

    same_string = {target_id: source_vocab[token] for token, target_id in target_vocab.items()
                   if target_id in target_specials and source_vocab.get(token) in source_specials}
    pairs: dict[int, int] = dict(same_string)
    for target_id, key in _keys(target_tok, target_style, mode, target_specials).items():
        options = candidates.get(key)
        if not options:
            continue
        token = target_tokens[target_id]
        pairs[target_id] = min(options, key=lambda s: (source_tokens[s] != token, s in byte_fallback, s))
    special, role_pairs = _match_specials(source_tok, target_tok, same_string)
    pairs.update(role_pairs)

    target_ids = np.array(sorted(pairs), dtype=np.int64)
    source_ids = np.array([pairs[t] for t in target_ids.tolist()], dtype=np.int64)
    return VocabAlignment(
        target_ids=target_ids,
        source_ids=source_ids,
        mode=mode,
        source_style=source_style,
        target_style=target_style,
        special=special,
        target_vocab_size=len(target_tok),
        source_vocab_size=len(source_tok),
    )


def _utf8_runs(data: bytes) -> list[str | int]:
    """``data`` split into maximal valid UTF-8 texts and the single bytes between them (as ints)."""
    parts: list[str | int] = []
    while data:
        try:
            parts.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            if e.start:
                parts.append(data[: e.start].decode("utf-8"))
            parts.extend(data[e.start : e.end])
            data = data[e.end :]
    return parts


def _encode_texts(tok: Any, style: str, texts: list[str]) -> list[list[int]]:
    """Source ids of each text, spelled exactly: a SentencePiece-style tokenizer's model runs on the text with
    spaces as '▁' (its normalizer would prefix word-internal text with a dummy '▁'); others encode plainly."""
    backend = getattr(tok, "backend_tokenizer", None)
    if style == "sentencepiece" and backend is not None:
        return [[t.id for t in backend.model.tokenize(text.replace(" ", _SP_SPACE))] for text in texts]
    return [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


def fvt_pieces(source_tok: Any, target_tok: Any, vocab_size: int, skip: np.ndarray | None = None) -> np.ndarray:
    """[vocab_size, P] source ids (-1 pads) of each target token's text encoded by the source tokenizer (FVT).

    The text is the token's canonical bytes (``Ġ`` / ``▁`` / ``##`` / ``<0xNN>`` undone), encoded without
    special tokens; bytes that are not valid UTF-8 on their own map to the source's single-byte token, if it
    has one. Special tokens, ids in ``skip`` (e.g. the overlap) and ids past the tokenizer get no pieces; so
    do texts that encode to nothing.
    """
    source_style, target_style = tokenizer_style(source_tok), tokenizer_style(target_tok)
    source_specials = _special_ids(source_tok)
    source_keys = _keys(source_tok, source_style, "canonical", source_specials)
    single_byte: dict[int, int] = {}
    for source_id, key in sorted(source_keys.items()):
        if isinstance(key, bytes) and len(key) == 1:
            single_byte.setdefault(key[0], source_id)
    skipped = set() if skip is None else {int(i) for i in skip}
    texts = {i: key for i, key in _keys(target_tok, target_style, "canonical", _special_ids(target_tok)).items()
             if i < vocab_size and i not in skipped and isinstance(key, bytes)}
    runs = {i: _utf8_runs(text) for i, text in texts.items()}
    strings = sorted({part for parts in runs.values() for part in parts if isinstance(part, str)})
    pieces_of = dict(zip(strings, _encode_texts(source_tok, source_style, strings)))
    rows: dict[int, list[int]] = {}
    for i, parts in runs.items():
        ids: list[int] = []
        for part in parts:
            ids += pieces_of[part] if isinstance(part, str) else [single_byte.get(part, -1)]
        rows[i] = [s for s in ids if s >= 0 and s not in source_specials]
    width = max((len(r) for r in rows.values()), default=0)
    table = np.full((vocab_size, max(width, 1)), -1, np.int64)
    for i, r in rows.items():
        table[i, : len(r)] = r
    return table
