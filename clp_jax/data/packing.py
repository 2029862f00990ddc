"""Packing tokenized documents into fixed rows of `seq_len`, with segment ids so attention stays inside documents.

Greedy and sequential (deterministic): documents, each followed by EOS, fill rows in order. A document
that does not fit in the rest of the current row starts the next row, leaving padding (segment 0) behind,
unless it is longer than a whole row: then it starts in the current row and continues over the next rows.
Each piece of a split document is its own segment, with positions again from 0. Given per-token byte
counts, the rows also carry `bytes` (EOS and padding 0), so a held-out loss can be reported in bits per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clp_jax.errors import ClpError


@dataclass(frozen=True)
class PackedBatches:
    """[rows, seq_len] int32 arrays: token ids, segment ids (1, 2, ... within a row; 0 = padding), positions,
    and optionally the UTF-8 bytes each token covers."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    bytes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def as_dict(self) -> dict[str, np.ndarray]:
        out = {"tokens": self.tokens, "segment_ids": self.segment_ids, "positions": self.positions}
        return out if self.bytes is None else {**out, "bytes": self.bytes}


def greedy_row_starts(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Start of each piece (length `lengths[i]`) in rows of `seq_len` laid end to end, placed greedily in order.

    A piece that fits a row but not the rest of the current one moves to the next row; longer ones do not.
    """
    starts = []
    pos = 0
    for n in lengths.tolist():
        col = pos % seq_len
        if col and seq_len - col < n <= seq_len:  # fits a row, but not this one: pad to the next row
            pos += seq_len - col
        starts.append(pos)
        pos += n
    return np.asarray(starts, dtype=np.int64)


def pack_documents(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, eos_id: int, pad_id: int = 0,
                   token_bytes: np.ndarray | None = None) -> PackedBatches:
    """Pack documents `tokens[offsets[i]:offsets[i+1]]`, each followed by `eos_id`, into rows of `seq_len`;
    `token_bytes` (aligned with `tokens`) go along into `bytes`."""
    if seq_len < 2:
        raise ClpError(f"seq_len must be >= 2, got {seq_len}")
    offsets = np.asarray(offsets, dtype=np.int64)
    doc_lens = np.diff(offsets)
    if offsets.ndim != 1 or len(offsets) == 0 or np.any(doc_lens < 0):
        raise ValueError("offsets must be a non-decreasing 1-D array with one more entry than documents")
    num_docs = len(doc_lens)
    body = np.asarray(tokens)[offsets[0]:offsets[-1]]
    lengths = doc_lens + 1  # with EOS
    stream = np.full(len(body) + num_docs, eos_id, dtype=np.int32)
    eos_at = offsets[1:] - offsets[0] + np.arange(num_docs)
    is_body = np.ones(len(stream), dtype=bool)
    is_body[eos_at] = False
    stream[is_body] = body

    starts = greedy_row_starts(lengths, seq_len)
    total = int(starts[-1] + lengths[-1]) if num_docs else 0
    rows = -(-total // seq_len)
    doc = np.repeat(np.arange(num_docs), lengths)
    dest = np.arange(len(stream)) + np.repeat(starts - (eos_at - doc_lens), lengths)  # stream index -> slot
    row_start = dest - dest % seq_len
    piece_start = np.maximum(np.repeat(starts, lengths), row_start)
    first_doc = doc[np.searchsorted(dest, np.arange(rows) * seq_len)]  # every row starts with a token

    out_tokens = np.full(rows * seq_len, pad_id, dtype=np.int32)
    out_segments = np.zeros(rows * seq_len, dtype=np.int32)
    out_positions = np.zeros(rows * seq_len, dtype=np.int32)
    out_tokens[dest] = stream
    out_segments[dest] = doc - first_doc[dest // seq_len] + 1
    out_positions[dest] = dest - piece_start
    shape = (rows, seq_len)
    out_bytes = None
    if token_bytes is not None:
        stream_bytes = np.zeros(len(stream), dtype=np.int32)
        stream_bytes[is_body] = np.asarray(token_bytes)[offsets[0]:offsets[-1]]
        out_bytes = np.zeros(rows * seq_len, dtype=np.int32)
        out_bytes[dest] = stream_bytes
        out_bytes = out_bytes.reshape(shape)
    return PackedBatches(out_tokens.reshape(shape), out_segments.reshape(shape), out_positions.reshape(shape),
                         out_bytes)
