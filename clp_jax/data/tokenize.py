"""Tokenizing a source into one flat token array plus document offsets, cached on disk.

Texts go to the fast tokenizer in batches (its Rust core encodes a batch in parallel), without special
tokens: packing inserts EOS. The cache is keyed by the documents' texts and the tokenizer, so a second
run with the same data and tokenizer loads two .npy files (memory-mapped) instead of tokenizing.
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

CACHE_VERSION = 1  # bump when the cached arrays' meaning changes
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


def _tokenize(texts: Sequence[str], tokenizer: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.zeros(len(texts), np.int64)
    chunks = [np.zeros(0, np.int32)]
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False,
                        return_attention_mask=False, verbose=False)["input_ids"]
        counts = [len(x) for x in ids]
        lengths[start:start + len(ids)] = counts
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=sum(counts)))
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.concatenate(chunks), offsets


def _cache_paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    root = Path(cache_dir)
    return root / f"{key}.tokens.npy", root / f"{key}.offsets.npy"


def _load_cached(cache_dir: str | os.PathLike, key: str, num_docs: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays (memory-mapped), or None when absent or not consistent with the documents."""
    tokens_path, offsets_path = _cache_paths(cache_dir, key)
    if not (tokens_path.is_file() and offsets_path.is_file()):
        return None
    try:
        tokens = np.load(tokens_path, mmap_mode="r")
        offsets = np.load(offsets_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    ok = (tokens.dtype == np.int32 and tokens.ndim == 1 and offsets.dtype == np.int64
          and offsets.shape == (num_docs + 1,) and offsets[0] == 0 and offsets[-1] == len(tokens))
    return (tokens, offsets) if ok else None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temp file in the same folder, then os.replace: readers never see half a file."""
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def _save_cached(cache_dir: str | os.PathLike, key: str, tokens: np.ndarray, offsets: np.ndarray) -> None:
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tokens_path, offsets_path = _cache_paths(cache_dir, key)
        _save_atomic(tokens_path, tokens)
        _save_atomic(offsets_path, offsets)  # written last: its presence marks a complete entry
    except OSError as e:
        raise ClpError(f"{cache_dir}: cannot write the token cache ({e.strerror or e})") from None


def tokenize_source(source: SourceData | Sequence[Document] | Sequence[str], tokenizer: Any,
                    cache_dir: str | os.PathLike | None = None, batch_size: int = 1000) -> TokenizedSource:
    """Token ids of every text document (no special tokens), from `cache_dir` when it holds them."""
    if batch_size < 1:
        raise ClpError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    name, language, texts = _texts(source)
    key = cache_key(texts, tokenizer) if cache_dir is not None else None
    cached = _load_cached(cache_dir, key, len(texts)) if key is not None else None
    if cached is not None:
        tokens, offsets = cached
    else:
        tokens, offsets = _tokenize(texts, tokenizer, batch_size)
        if key is not None:
            _save_cached(cache_dir, key, tokens, offsets)
    stats = TokenizeStats(len(texts), len(tokens), time.perf_counter() - start, cached is not None)
    return TokenizedSource(name, language, tokens, offsets, stats)
