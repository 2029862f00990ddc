"""Corpus sources: text files, JSON lines, Parquet, Arrow / `datasets` save_to_disk dirs and local TFDS datasets,
read into documents with clear errors.

A path is a file, a folder (every non-hidden file under it, sorted; a save_to_disk dir: its Arrow files) or a
glob. gzip and zstd files are recognised by their first bytes and decompressed while reading. Lines that are
not valid UTF-8 are skipped and counted, and so are records whose fields are null or empty. Task "lm" reads
plain texts; any other task (e.g. "sft") reads prompt/response pairs.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import model_validator

from clp_jax.config import ConfigModel
from clp_jax.data.columnar import is_saved_dataset, read_rows, saved_dataset_files
from clp_jax.errors import ClpError

LM_TASK = "lm"
MIXED_LANGUAGE = "mul"  # ISO 639-2 code for "multiple languages"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COLUMNAR_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
UTF8_BOM = b"\xef\xbb\xbf"
TFDS_CHUNK = 1024


class SourceConfig(ConfigModel):
    """One corpus: where it lives, how to read it, and which language and task it holds.

    Exactly one of `path` (file, folder or glob) and `tfds` (a dataset name, read from `data_dir`) is set.
    `language` labels every document; for JSON, Parquet, Arrow and TFDS records that carry `language_field`,
    the record's value is used when `language` is unset, and records of other languages are skipped when it is
    set. `format` "auto" infers it per file from the extension (a save_to_disk dir is "arrow"); `split` picks
    the split of a TFDS dataset or of a `datasets` DatasetDict dir.
    """

    name: str
    path: str | None = None
    tfds: str | None = None
    data_dir: str | None = None
    split: str = "train"
    format: Literal["auto", "text", "jsonl", "parquet", "arrow", "tfds"] = "auto"
    per_line: bool = True
    text_field: str = "text"
    inputs_field: str = "inputs"
    targets_field: str = "targets"
    language_field: str | None = "language"
    language: str | None = None
    task: str = LM_TASK

    @model_validator(mode="after")
    def _check_location(self) -> SourceConfig:
        if (self.path is None) == (self.tfds is None):
            raise ValueError(f"source '{self.name}' needs exactly one of 'path' or 'tfds'")
        if (self.format == "tfds") != (self.tfds is not None) and self.format != "auto":
            raise ValueError(f"source '{self.name}': format '{self.format}' does not fit "
                             f"{'a TFDS dataset' if self.tfds else 'a path'}")
        if self.language is None and (self.language_field is None or self.format == "text"):
            raise ValueError(f"source '{self.name}' needs a 'language' (its records carry none)")
        return self

    @property
    def pairs(self) -> bool:
        """Whether documents are prompt/response pairs (any task but "lm")."""
        return self.task != LM_TASK


@dataclass(frozen=True, slots=True)
class Document:
    """One pretraining `text`, or one prompt/response pair (`inputs`, `targets`) for SFT."""

    language: str
    task: str
    text: str | None = None
    inputs: str | None = None
    targets: str | None = None


@dataclass
class SourceStats:
    """What reading a source found: documents kept and lines or records skipped, and why."""

    documents: int = 0
    skipped_undecodable: int = 0
    skipped_empty: int = 0
    skipped_language: int = 0
    files: list[str] = field(default_factory=list)
    other_languages: collections.Counter = field(default_factory=collections.Counter, repr=False)

    def summary(self) -> str:
        skipped = [f"{n} {why}" for n, why in ((self.skipped_undecodable, "undecodable lines"),
                                               (self.skipped_empty, "empty records"),
                                               (self.skipped_language, "records in other languages")) if n]
        return (f"{self.documents} documents from {len(self.files)} file(s)"
                + (f", skipped {', '.join(skipped)}" if skipped else ""))


@dataclass(frozen=True)
class SourceData:
    """All documents of a source, in reading order, with the statistics of reading it."""

    config: SourceConfig
    documents: list[Document]
    stats: SourceStats

    @property
    def language(self) -> str:
        """The language of every document, or "mul" when they differ."""
        languages = {d.language for d in self.documents}
        return languages.pop() if len(languages) == 1 else MIXED_LANGUAGE


def resolve_files(path: str) -> list[str]:
    """The sorted files a path names: itself, every non-hidden file under a folder, or a glob's matches."""
    expanded = os.path.expanduser(path)
    if any(c in expanded for c in "*?["):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise ClpError(f"{path}: no files match this pattern")
    elif os.path.isdir(expanded):
        root = Path(expanded)
        files = sorted(str(p) for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise ClpError(f"{path}: folder has no files")
    elif os.path.isfile(expanded):
        files = [expanded]
    else:
        raise ClpError(f"{path}: no such file or folder")
    return files


@contextlib.contextmanager
def _open_binary(path: str) -> Iterator[BinaryIO]:
    """A file's bytes, decompressed when it starts like a gzip or zstd stream."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise ClpError(f"{path}: cannot read ({e.strerror or e})") from None
    with raw:
        magic = raw.peek(4)[:4]
        if magic.startswith(GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw) as f:
                yield f
        elif magic == ZSTD_MAGIC:
            try:
                import zstandard
            except ImportError:
                raise ClpError(f"{path}: file is zstd-compressed; reading it needs the zstandard package "
                               "(pip install zstandard)") from None
            with io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)) as f:
                yield f
        else:
            yield raw


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line with its line break) of a possibly compressed file."""
    with _open_binary(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                yield lineno, (line[len(UTF8_BOM):] if lineno == 1 and line.startswith(UTF8_BOM) else line)
        except (OSError, EOFError, zlib.error) as e:
            raise ClpError(f"{path}: cannot decompress ({e})") from None
        except Exception as e:  # zstandard.ZstdError, without importing zstandard
            if type(e).__name__ != "ZstdError":
                raise
            raise ClpError(f"{path}: cannot decompress ({e})") from None


def _decode(raw: bytes, stats: SourceStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_undecodable += 1
        return None


def _string_field(record: dict, key: str, where: str) -> str | None:
    """A record's string field; None when it is null (JSON null, a Parquet or Arrow null)."""
    if key not in record:
        raise ClpError(f"{where}: missing field '{key}' (fields: {', '.join(map(str, record)) or 'none'})")
    value = record[key]
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")  # TFDS text features; UnicodeDecodeError is counted by the caller
    if not isinstance(value, str):
        raise ClpError(f"{where}: field '{key}' must be a string, found {type(value).__name__}")
    return value


def _record_document(record: dict, src: SourceConfig, where: str, stats: SourceStats) -> Document | None:
    """The document of one JSON or TFDS record, or None when it is skipped (and counted)."""
    try:
        language = src.language
        if src.language_field and (src.language_field in record or src.language is None):
            own = (_string_field(record, src.language_field, where) or "").strip()
            if own and language is not None and own != language:
                stats.skipped_language += 1
                stats.other_languages[own] += 1
                return None
            language = own or language  # a null language is a record without one
        if not language:  # no source language and a null or empty record language: counted as empty
            doc = None
        elif src.pairs:
            inputs = (_string_field(record, src.inputs_field, where) or "").strip()
            targets = (_string_field(record, src.targets_field, where) or "").strip()
            doc = Document(language, src.task, inputs=inputs, targets=targets) if inputs and targets else None
        else:
            text = (_string_field(record, src.text_field, where) or "").strip()
            doc = Document(language, src.task, text=text) if text else None
    except UnicodeDecodeError:
        stats.skipped_undecodable += 1
        return None
    if doc is None:
        stats.skipped_empty += 1
    return doc


def _file_format(src: SourceConfig, path: str) -> str:
    if src.format != "auto":
        return src.format
    name = path.lower()
    for suffix in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return COLUMNAR_SUFFIXES.get(os.path.splitext(name)[1], "text")


def _text_documents(src: SourceConfig, path: str, stats: SourceStats) -> Iterator[Document]:
    if src.pairs:
        raise ClpError(f"{path}: task '{src.task}' needs prompt/response records (JSON lines with "
                       f"'{src.inputs_field}' and '{src.targets_field}'), but this is a text file")
    if src.language is None:
        raise ClpError(f"{path}: a text file has no per-record language; set 'language' for source '{src.name}'")
    blank = True
    parts: list[str] = []
    for _, raw in _lines(path):
        if raw.strip():
            blank = False
        elif src.per_line:
            continue
        line = _decode(raw, stats)
        if line is None:
            continue
        if not src.per_line:
            parts.append(line)
        elif line.strip():
            yield Document(src.language, src.task, text=line.strip())
    if blank:
        raise ClpError(f"{path}: file is empty (no non-blank lines)")
    if parts and "".join(parts).strip():
        yield Document(src.language, src.task, text="".join(parts).strip())


def _jsonl_documents(src: SourceConfig, path: str, stats: SourceStats) -> Iterator[Document]:
    blank = True
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        blank = False
        line = _decode(raw, stats)
        if line is None:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ClpError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                           "expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise ClpError(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}")
        doc = _record_document(record, src, f"{path}:{lineno}", stats)
        if doc is not None:
            yield doc
    if blank:
        raise ClpError(f"{path}: file is empty (no non-blank lines)")


def _columnar_documents(src: SourceConfig, path: str, fmt: str, stats: SourceStats) -> Iterator[Document]:
    """Records of a Parquet or Arrow file, reading only the fields the source needs, batch by batch."""
    fields = [src.inputs_field, src.targets_field] if src.pairs else [src.text_field]
    optional = []
    if src.language_field:
        (fields if src.language is None else optional).append(src.language_field)
    for row, record in enumerate(read_rows(path, fmt, fields, optional)):
        doc = _record_document(record, src, f"{path} row {row}", stats)
        if doc is not None:
            yield doc


def _source_files(src: SourceConfig) -> list[str]:
    """The files of a path source: a save_to_disk dir's Arrow files (of `split`), else `resolve_files`."""
    assert src.path is not None
    expanded = os.path.expanduser(src.path)
    if src.format in ("auto", "arrow") and os.path.isdir(expanded) and is_saved_dataset(expanded):
        return saved_dataset_files(expanded, src.split)
    return resolve_files(src.path)


def _tfds_where(src: SourceConfig) -> str:
    return f"TFDS dataset '{src.tfds}' (split '{src.split}', data_dir {src.data_dir or 'the TFDS default'})"


def _tfds_documents(src: SourceConfig, stats: SourceStats) -> Iterator[Document]:
    """Records of a prepared TFDS dataset, through its random-access data source (no TensorFlow needed)."""
    assert src.tfds is not None
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ClpError(f"source '{src.name}': reading TFDS datasets needs tensorflow-datasets") from None
    data_dir = os.path.expanduser(src.data_dir) if src.data_dir else None
    folder = src.tfds.split(":")[0]
    if data_dir is not None and not os.path.isdir(os.path.join(data_dir, folder)):
        raise ClpError(f"TFDS dataset '{src.tfds}' not found in data_dir {src.data_dir} (no folder '{folder}' "
                       "there; prepare it with file_format='array_record')")
    try:
        ds = tfds.data_source(src.tfds, data_dir=data_dir, split=src.split, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ClpError(f"TFDS dataset '{src.tfds}' not found in data_dir "
                       f"{src.data_dir or '(the TFDS default)'}") from None
    except (ValueError, NotImplementedError, AssertionError, OSError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClpError(f"{_tfds_where(src)}: cannot open ({reason})") from None
    stats.files.append(str(getattr(ds.dataset_info, "data_dir", data_dir)))
    for start in range(0, len(ds), TFDS_CHUNK):
        indices = list(range(start, min(len(ds), start + TFDS_CHUNK)))
        records: Any = ds.__getitems__(indices) if hasattr(ds, "__getitems__") else [ds[i] for i in indices]
        for i, record in zip(indices, records):
            doc = _record_document(record, src, f"{_tfds_where(src)} record {i}", stats)
            if doc is not None:
                yield doc


def _iter_documents(src: SourceConfig, stats: SourceStats) -> Iterator[Document]:
    if src.tfds is not None:
        yield from _tfds_documents(src, stats)
        return
    for path in _source_files(src):
        stats.files.append(path)
        fmt = _file_format(src, path)
        if fmt in ("parquet", "arrow"):
            yield from _columnar_documents(src, path, fmt, stats)
        else:
            yield from (_jsonl_documents if fmt == "jsonl" else _text_documents)(src, path, stats)


def read_source(src: SourceConfig) -> SourceData:
    """All documents of a source with its statistics; a source that yields no document is a ClpError."""
    stats = SourceStats()
    documents = list(_iter_documents(src, stats))
    stats.documents = len(documents)
    if not documents:
        where = src.path if src.tfds is None else _tfds_where(src)
        if stats.skipped_language:
            seen = ", ".join(lang for lang, _ in stats.other_languages.most_common(8))
            raise ClpError(f"{where}: source '{src.name}' has no documents in language '{src.language}' "
                           f"(records' '{src.language_field}' values: {seen})")
        if stats.skipped_undecodable:
            raise ClpError(f"{where}: source '{src.name}' has no documents: all {stats.skipped_undecodable} "
                           "non-blank lines or records are not valid UTF-8")
        raise ClpError(f"{where}: source '{src.name}' has no documents (every record is empty)")
    return SourceData(src, documents, stats)
