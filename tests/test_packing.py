"""Packing: every token kept in order with EOS between documents, segments and positions per document, speed."""

import time

import numpy as np
import pytest
from oracles import next_token_targets

from clp_jax.data.packing import greedy_row_starts, pack_documents

EOS, PAD = 0, 1


def random_documents(n, max_len, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(2, 500, size=int(offsets[-1])).astype(np.int32)
    return tokens, offsets


def pieces(packed):
    """(row, segment id, token ids, positions) of every segment, in row-major order."""
    out = []
    for r in range(len(packed)):
        for s in range(1, packed.segment_ids[r].max() + 1):
            where = packed.segment_ids[r] == s
            assert np.all(np.diff(np.flatnonzero(where)) == 1), "a segment is contiguous"
            out.append((r, s, packed.tokens[r][where], packed.positions[r][where]))
    return out


def documents_from(packed):
    """Reassemble documents: join segment pieces, a document ending at each EOS."""
    docs, current = [], []
    for _, _, toks, _ in pieces(packed):
        for t in toks.tolist():
            if t == EOS:
                docs.append(current)
                current = []
            else:
                current.append(t)
    assert current == [], "the last document ends with EOS"
    return docs


@pytest.mark.parametrize("seq_len", [8, 16, 64])
def test_every_token_is_kept_in_order_with_eos_separators(seq_len):
    tokens, offsets = random_documents(60, 40)
    packed = pack_documents(tokens, offsets, seq_len, eos_id=EOS, pad_id=PAD)
    assert packed.tokens.shape == packed.segment_ids.shape == packed.positions.shape == (len(packed), seq_len)
    assert {a.dtype for a in (packed.tokens, packed.segment_ids, packed.positions)} == {np.dtype(np.int32)}
    expected = [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    assert documents_from(packed) == expected
    assert np.all(packed.tokens[packed.segment_ids == 0] == PAD)
    assert np.all(packed.positions[packed.segment_ids == 0] == 0)
    assert np.sum(packed.segment_ids > 0) == len(tokens) + len(expected)


def test_segments_number_documents_within_each_row_and_positions_restart():
    tokens, offsets = random_documents(80, 30, seed=1)
    packed = pack_documents(tokens, offsets, 32, eos_id=EOS, pad_id=PAD)
    for row in packed.segment_ids:
        used = row[row > 0]
        assert used[0] == 1 and np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1)
        assert np.all(row[len(used):] == 0), "padding only at the end of a row"
    for _, _, _, positions in pieces(packed):
        np.testing.assert_array_equal(positions, np.arange(len(positions)))


def test_short_documents_are_never_split_and_long_ones_are():
    lengths = [3, 5, 2, 20, 4, 7, 0, 6]  # +1 EOS each; seq_len 8: "5" and "7" fit a row, "20" does not
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(2, 2 + offsets[-1], dtype=np.int32)
    packed = pack_documents(tokens, offsets, 8, eos_id=EOS, pad_id=PAD)
    assert documents_from(packed) == [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(lengths))]
    # with EOS the pieces are 4, 6, 3, 21, 5, 8, 1, 7 long; a piece that fits a row but not the current one
    # moves to the next row: row 0 = doc0 + padding, row 1 = doc1 + padding
    np.testing.assert_array_equal(packed.segment_ids[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed.segment_ids[1], [1, 1, 1, 1, 1, 1, 0, 0])
    # row 2: doc2, then the long doc3 starts right behind it and runs over rows 3 and 4
    np.testing.assert_array_equal(packed.segment_ids[2], [1, 1, 1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(packed.positions[2], [0, 1, 2, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(packed.segment_ids[3], [1] * 8)
    np.testing.assert_array_equal(packed.positions[3], np.arange(8))  # a continuation piece restarts at 0
    np.testing.assert_array_equal(packed.tokens[3], tokens[offsets[3] + 5:offsets[3] + 13])
    np.testing.assert_array_equal(packed.tokens[4], [*tokens[offsets[3] + 13:offsets[4]], EOS])
    # row 5: doc4 + padding (doc5 needs 8); row 6: doc5; row 7: the empty doc6 (EOS only) and doc7
    np.testing.assert_array_equal(packed.segment_ids[5], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(packed.segment_ids[6], [1] * 8)
    np.testing.assert_array_equal(packed.segment_ids[7], [1, 2, 2, 2, 2, 2, 2, 2])
    assert len(packed) == 8 and packed.tokens[7, 0] == EOS


def test_greedy_row_starts_rule():
    lengths = np.array([3, 2, 5, 2, 9, 1, 2])  # row length 4: a 2 after a 3 moves on; 5 and 9 never do
    np.testing.assert_array_equal(greedy_row_starts(lengths, 4), [0, 4, 6, 12, 14, 23, 24])
    assert greedy_row_starts(np.array([], dtype=np.int64), 4).shape == (0,)


def test_next_token_targets_never_cross_documents():
    tokens, offsets = random_documents(50, 20, seed=2)
    packed = pack_documents(tokens, offsets, 16, eos_id=EOS, pad_id=PAD)
    targets, weights = next_token_targets(packed.tokens, packed.segment_ids)
    assert targets.shape == weights.shape == packed.tokens.shape and weights.dtype == np.float32
    r, t = np.nonzero(weights)
    np.testing.assert_array_equal(targets[r, t], packed.tokens[r, t + 1])
    assert np.all(packed.segment_ids[r, t] == packed.segment_ids[r, t + 1]) and np.all(packed.segment_ids[r, t] > 0)
    assert np.all(packed.tokens[r, t] != EOS), "EOS never predicts the next document's first token"
    assert np.all(weights[:, -1] == 0)
    # one prediction per token except each piece's first token
    assert weights.sum() == np.sum(packed.segment_ids > 0) - len(pieces(packed))


def test_offsets_of_a_slice_and_empty_input():
    tokens, offsets = random_documents(10, 10, seed=3)
    whole = pack_documents(tokens, offsets, 8, eos_id=EOS, pad_id=PAD)
    part = pack_documents(tokens, offsets[3:7], 8, eos_id=EOS, pad_id=PAD)
    assert documents_from(part) == [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(3, 6)]
    assert len(whole) >= len(part)
    empty = pack_documents(np.zeros(0, np.int32), np.zeros(1, np.int64), 8, eos_id=EOS)
    assert empty.tokens.shape == (0, 8)


def test_packing_is_deterministic_and_fast():
    tokens, offsets = random_documents(40_000, 50, seed=4)  # about a million tokens
    assert len(tokens) > 950_000
    start = time.perf_counter()
    packed = pack_documents(tokens, offsets, 1024, eos_id=EOS, pad_id=PAD)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"packing {len(tokens)} tokens took {seconds:.2f} s"
    again = pack_documents(tokens, offsets, 1024, eos_id=EOS, pad_id=PAD)
    for a, b in zip(packed.as_dict().values(), again.as_dict().values()):
        np.testing.assert_array_equal(a, b)
    assert np.mean(packed.segment_ids > 0) > 0.97  # short documents waste little padding


@pytest.mark.parametrize("seq_len", [8, 64])
def test_token_bytes_travel_with_their_tokens(seq_len):
    """`bytes` holds each token's count at its packed slot (EOS and padding 0); the targets the loss weights
    select carry the bytes of every token but each piece's first, summed here against a per-document oracle."""
    tokens, offsets = random_documents(60, 30, seed=5)
    nbytes = np.random.default_rng(6).integers(0, 5, size=len(tokens)).astype(np.int32)
    packed = pack_documents(tokens, offsets, seq_len, eos_id=EOS, pad_id=PAD, token_bytes=nbytes)
    plain = pack_documents(tokens, offsets, seq_len, eos_id=EOS, pad_id=PAD)
    assert "bytes" not in plain.as_dict() and packed.as_dict()["bytes"] is packed.bytes
    for a, b in zip(plain.as_dict().values(), packed.as_dict().values()):
        np.testing.assert_array_equal(a, b)  # the same rows, bytes beside them
    assert packed.bytes.dtype == np.int32 and packed.bytes.shape == packed.tokens.shape
    stream_tokens, stream_bytes = [], []
    for r, s, toks, _ in pieces(packed):
        stream_tokens += toks.tolist()
        stream_bytes += packed.bytes[r][packed.segment_ids[r] == s].tolist()
    eos_at = offsets[1:] + np.arange(len(offsets) - 1)
    expected = np.insert(nbytes, offsets[1:], 0)  # EOS after each document covers nothing
    np.testing.assert_array_equal(stream_bytes, expected)
    np.testing.assert_array_equal(np.asarray(stream_tokens)[eos_at], EOS)
    assert np.all(packed.bytes[packed.segment_ids == 0] == 0)
    _, weights = next_token_targets(packed.tokens, packed.segment_ids)
    covered = (weights[:, :-1] * packed.bytes[:, 1:]).sum()
    firsts = sum(int(packed.bytes[r][packed.segment_ids[r] == s][0]) for r, s, _, _ in pieces(packed))
    assert covered == nbytes.sum() - firsts
    if seq_len == 64:  # no document is split: the first tokens not predicted are the documents' own
        assert covered == sum(int(nbytes[a + 1:b].sum()) for a, b in zip(offsets[:-1], offsets[1:]))
