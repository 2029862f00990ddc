"""Tokenizing a source into one flat token array, the UTF-8 bytes each token covers, and document offsets,
cached on disk.

Texts go to the fast tokenizer in batches (its Rust core encodes a batch in parallel), without special
tokens: packing inserts EOS. The cache is keyed by the documents' texts and the tokenizer, so a second
run with the same data and tokenizer loads three .npy files (memory-mapped) instead of tokenizing.

Byte coverage (for bits per byte, comparable across tokenizers): token i of an encoding covers the UTF-8
bytes of the text from the furthest character-span end among tokens 0..i-1 (0 for token 0) to the end of
its own span, and the last token also covers whatever text follows it. The counts of an encoding sum to
the text's UTF-8 length; special tokens with empty (0, 0) spans (BOS, EOS) cover nothing; byte-fallback
or byte-level tokens that share one character's span count its bytes once, on the first of them; a leading
space trimmed from a token's span still counts, on that token.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clp_jax.data.sources import MIXED_LANGUAGE, Document, SourceData
from clp_jax.errors import ClpError
from clp_jax.files import atomic_open

CACHE_VERSION = 2  # bump when the cached arrays' meaning changes
UNDETERMINED_LANGUAGE = "und"  # ISO 639-2, for plain strings given without a language


@dataclass(frozen=True)
class TokenizeStats:
    """Documents and tokens of a tokenized source, how long it took, and whether the cache answered."""

    documents: int
    tokens: int
    seconds: float
    from_cache: bool


@dataclass(frozen=True)
class TokenizedSource:
    """Token ids of every document back to back: document i is `tokens[offsets[i]:offsets[i + 1]]`."""

    name: str
    language: str
    tokens: np.ndarray  # int32 [num_tokens]
    token_bytes: np.ndarray  # int32 [num_tokens], UTF-8 bytes of text each token covers (module docstring)
    offsets: np.ndarray  # int64 [num_documents + 1], offsets[0] == 0
    stats: TokenizeStats

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def summary(self) -> str:
        """One report line: documents and tokens of this source."""
        s = self.stats
        return (f"{self.name} ({self.language}): {s.documents:,} documents, {s.tokens:,} tokens, "
                f"{s.seconds:.1f} s{' (from cache)' if s.from_cache else ''}")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that decides a fast tokenizer's ids: its serialized pipeline and added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ClpError(f"{type(tokenizer).__name__} is not a fast tokenizer (no tokenizer.json); "
                       "tokenizing needs one")
    h = hashlib.sha256(backend.to_str().encode("utf-8"))
    added = sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1])
    h.update(json.dumps([added, getattr(tokenizer, "special_tokens_map", {})], sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(texts: Sequence[str], tokenizer: Any) -> str:
    """sha256 of (format version, tokenizer fingerprint, every text length-prefixed)."""
    h = hashlib.sha256(f"clp-jax tokens v{CACHE_VERSION}\n{tokenizer_fingerprint(tokenizer)}\n".encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _texts(source: SourceData | Sequence[Document] | Sequence[str]) -> tuple[str, str, list[str]]:
    """(name, language, texts) of what `tokenize_source` was given."""
    if isinstance(source, SourceData):
        name, docs = source.config.name, source.documents
    else:
        name, docs = "documents", list(source)
    if all(isinstance(d, str) for d in docs):
        return name, UNDETERMINED_LANGUAGE, list(docs)  # type: ignore[arg-type]
    if any(not isinstance(d, Document) or d.text is None for d in docs):
        raise ClpError(f"source '{name}' holds prompt/response pairs, not texts; format them with clp_jax.data.sft")
    languages = {d.language for d in docs}
    language = languages.pop() if len(languages) == 1 else MIXED_LANGUAGE
    return name, language, [d.text for d in docs]  # type: ignore[misc]


def _char_byte_offsets(text: str) -> np.ndarray:
    """UTF-8 byte offset of each character boundary of `text`: int64 [len(text) + 1]."""
    code = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (code >= 0x80).astype(np.int64) + (code >= 0x800) + (code >= 0x10000)
    out = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(width, out=out[1:])
    return out


def token_bytes(texts: Sequence[str], offsets: Sequence[Sequence[tuple[int, int]]]) -> np.ndarray:
    """UTF-8 bytes of its text each token covers (the module docstring's rule), int32, for all texts back to back.

    `offsets[i]` are the character spans a fast tokenizer returns for `texts[i]` (`return_offsets_mapping`);
    each text's counts sum to its UTF-8 length when it has any token.
    """
    counts = np.fromiter((len(o) for o in offsets), np.int64, count=len(offsets))
    ends = np.fromiter((e for spans in offsets for _, e in spans), np.int64, count=int(counts.sum()))
    starts = np.cumsum(counts) - counts
    sizes = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):  # character ends -> byte ends
        if text.isascii():
            sizes[i] = len(text)
            continue
        table = _char_byte_offsets(text)
        sizes[i] = table[-1]
        span = slice(starts[i], starts[i] + counts[i])
        ends[span] = table[np.minimum(ends[span], len(text))]
    base = np.cumsum(sizes) - sizes  # each text's first byte in all texts laid end to end
    reach = np.maximum.accumulate(np.minimum(ends, np.repeat(sizes, counts)) + np.repeat(base, counts))
    has = counts > 0
    reach[starts[has] + counts[has] - 1] = base[has] + sizes[has]  # the last token covers the rest of its text
    out = np.diff(reach, prepend=0)
    out[starts[has]] = reach[starts[has]] - base[has]
    return out.astype(np.int32)


def encode_with_bytes(tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of each text (`tokenizer(texts, **kwargs)`) and the flat `token_bytes` of all its tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise ClpError(f"{type(tokenizer).__name__} is not a fast tokenizer (no tokenizer.json); counting the "
                       "bytes its tokens cover needs its offsets")
    texts = list(texts)
    enc = tokenizer(texts, return_offsets_mapping=True, return_attention_mask=False, verbose=False, **kwargs)
    return enc["input_ids"], token_bytes(texts, enc["offset_mapping"])


def _tokenize(texts: Sequence[str], tokenizer: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.zeros(len(texts), np.int64)
    chunks, byte_chunks = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
    for start in range(0, len(texts), batch_size):
        ids, nbytes = encode_with_bytes(tokenizer, texts[start:start + batch_size], add_special_tokens=False)
        counts = [len(x) for x in ids]
        lengths[start:start + len(ids)] = counts
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=sum(counts)))
        byte_chunks.append(nbytes)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.concatenate(chunks), np.concatenate(byte_chunks), offsets


def _cache_paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path, Path]:
    """(tokens, token bytes, offsets) files of a cache entry; offsets are written last."""
    root = Path(cache_dir)
    return root / f"{key}.tokens.npy", root / f"{key}.bytes.npy", root / f"{key}.offsets.npy"


def _load_cached(cache_dir: str | os.PathLike, key: str,
                 num_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached (tokens, token bytes, offsets), memory-mapped, or None when absent or not consistent."""
    paths = _cache_paths(cache_dir, key)
    if not all(p.is_file() for p in paths):
        return None
    try:
        tokens, nbytes, offsets = (np.load(p, mmap_mode="r") for p in paths)
    except (OSError, ValueError):
        return None
    ok = (tokens.dtype == np.int32 and tokens.ndim == 1 and nbytes.dtype == np.int32 and nbytes.shape == tokens.shape
          and offsets.dtype == np.int64 and offsets.shape == (num_docs + 1,) and offsets[0] == 0
          and offsets[-1] == len(tokens))
    return (tokens, nbytes, offsets) if ok else None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temp file in the same folder, then os.replace: readers never see half a file."""
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def _save_cached(cache_dir: str | os.PathLike, key: str, arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for path, array in zip(_cache_paths(cache_dir, key), arrays):  # offsets last: they mark a complete entry
            _save_atomic(path, array)
    except OSError as e:
        raise ClpError(f"{cache_dir}: cannot write the token cache ({e.strerror or e})") from None


def tokenize_source(source: SourceData | Sequence[Document] | Sequence[str], tokenizer: Any,
                    cache_dir: str | os.PathLike | None = None, batch_size: int = 1000) -> TokenizedSource:
    """Token ids and covered bytes of every text document (no special tokens), from `cache_dir` when it holds them."""
    if batch_size < 1:
        raise ClpError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    name, language, texts = _texts(source)
    key = cache_key(texts, tokenizer) if cache_dir is not None else None
    cached = _load_cached(cache_dir, key, len(texts)) if key is not None else None
    arrays = cached if cached is not None else _tokenize(texts, tokenizer, batch_size)
    if cached is None and key is not None:
        _save_cached(cache_dir, key, arrays)
    tokens, nbytes, offsets = arrays
    stats = TokenizeStats(len(texts), len(tokens), time.perf_counter() - start, cached is not None)
    return TokenizedSource(name, language, tokens, nbytes, offsets, stats)
