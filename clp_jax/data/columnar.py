"""Parquet files, Arrow IPC files and Hugging Face `datasets` save_to_disk dirs, read batch by batch with pyarrow.

Only the columns a source needs are read, at most `BATCH_ROWS` rows at a time: a file is never held in memory
whole (Parquet row group by row group; Arrow files memory-mapped, record batch by record batch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from clp_jax.errors import ClpError

BATCH_ROWS = 1024
ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format; `datasets` writes the IPC stream format, which has none
DATASET_DICT_JSON = "dataset_dict.json"  # a DatasetDict: {"splits": [...]}, one save_to_disk dir per split
DATASET_STATE_JSON = "state.json"  # a Dataset: {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], ...}


def is_saved_dataset(path: str) -> bool:
    """Whether a folder is a `datasets` save_to_disk dir (a Dataset or a DatasetDict)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in (DATASET_DICT_JSON, DATASET_STATE_JSON))


def _read_json(path: str, key: str) -> Any:
    """The value of `key` in a `datasets` metadata file (None when absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClpError(f"{path}: cannot read this `datasets` metadata file ({e})") from None
    return data.get(key) if isinstance(data, dict) else None


def _split_dir(path: str, split: str) -> str:
    """The Dataset dir of a DatasetDict's split, or `path` itself when it is a Dataset."""
    meta = os.path.join(path, DATASET_DICT_JSON)
    if not os.path.isfile(meta):
        return path
    splits = _read_json(meta, "splits")
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise ClpError(f"{meta}: expected {{\"splits\": [names]}}")
    if split not in splits:
        raise ClpError(f"{path}: no split '{split}' in this dataset (splits: {', '.join(splits) or 'none'}); "
                       "set the source's 'split'")
    return os.path.join(path, split)


def saved_dataset_files(path: str, split: str) -> list[str]:
    """The Arrow files of a save_to_disk dir in order: a Dataset's, or those of a DatasetDict's `split`."""
    folder = _split_dir(path, split)
    state = os.path.join(folder, DATASET_STATE_JSON)
    if os.path.isfile(state):
        entries = _read_json(state, "_data_files")
        entries = entries if isinstance(entries, list) else []
        names = [e.get("filename") if isinstance(e, dict) else None for e in entries]
        if not names or not all(isinstance(n, str) and n == os.path.basename(n) for n in names):
            raise ClpError(f"{state}: expected '_data_files': [{{\"filename\": \"data-00000-of-00001.arrow\"}}, ...]")
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".arrow")) if os.path.isdir(folder) else []
        if not names:
            raise ClpError(f"{folder}: not a `datasets` save_to_disk dir (no {DATASET_STATE_JSON}, no .arrow files)")
    files = [os.path.join(folder, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ClpError(f"{missing[0]}: data file listed in {state} is missing")
    return files


def _check_columns(path: str, columns: Sequence[str], fields: Sequence[str], optional: Sequence[str]) -> list[str]:
    """The columns to read: every field (a missing one is a ClpError listing the file's columns), then optionals."""
    missing = [f for f in fields if f not in columns]
    if missing:
        raise ClpError(f"{path}: missing field '{missing[0]}' (columns: {', '.join(columns) or 'none'})")
    return list(dict.fromkeys([*fields, *(f for f in optional if f in columns)]))


def _parquet_batches(path: str, fields: Sequence[str], optional: Sequence[str]) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise ClpError(f"{path}: not a Parquet file ({str(e).strip() or type(e).__name__})") from None
    with pf:
        columns = _check_columns(path, pf.schema_arrow.names, fields, optional)
        for group in range(pf.num_row_groups):
            yield from pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns)


def _arrow_batches(path: str, fields: Sequence[str], optional: Sequence[str]) -> Iterator[Any]:
    import pyarrow as pa

    with pa.memory_map(path, "r") as source:
        try:
            if source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
        except (pa.ArrowException, OSError) as e:
            raise ClpError(f"{path}: not an Arrow IPC stream or file ({str(e).strip() or type(e).__name__})") from None
        columns = _check_columns(path, reader.schema.names, fields, optional)
        for batch in batches:
            yield from (batch.slice(i, BATCH_ROWS).select(columns) for i in range(0, batch.num_rows, BATCH_ROWS))


def read_rows(path: str, fmt: str, fields: Sequence[str], optional: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet ("parquet") or Arrow ("arrow") file as dicts of `fields` plus the `optional` fields
    it has, lazily, one batch of at most BATCH_ROWS rows in memory at a time (nulls come as None)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ClpError(f"{path}: reading Parquet and Arrow files needs pyarrow (pip install pyarrow)") from None
    batches = _parquet_batches(path, fields, optional) if fmt == "parquet" else _arrow_batches(path, fields, optional)
    for batch in batches:
        yield from batch.to_pylist()
