"""The strategy names and ill-conditioning thresholds (light enough for `--help`), input checks of
``init_target_embeddings`` in words, and FVT's pieces as a compact index table."""

from __future__ import annotations

from typing import Any

import numpy as np

from clp_jax.errors import ClpError

STRATEGIES = ("clp", "clp-topk", "clp-sparsemax", "omp", "fvt", "random", "mean", "overlap")
HELPER_STRATEGIES = ("clp", "clp-topk", "clp-sparsemax", "omp")
BLOCKED_STRATEGIES = (*HELPER_STRATEGIES, "fvt")
MIN_MEAN_COS = 0.01  # clp: a cosine sum below 1% of the overlap size (mean cosine < 0.01) is ill-conditioned
MAX_NORM_FACTOR = 1.5  # any strategy: a row 1.5x longer than the longest source row is ill-conditioned
ALL_STRATEGIES = (*STRATEGIES, "from-scratch")  # from-scratch replaces the whole model, not only the embeddings
DEFAULT_STRATEGY = "fvt"  # best on held-out bits per byte after continued pretraining on both measured pairs (README)


def validate_inputs(
    strategy: str, source: Any, helper: Any, overlap_target: Any, overlap_source: Any, vocab: int,
    block_size: int, top_k: int, temperature: float, omp_k: int, min_mean_cos: float, max_norm_factor: float,
) -> tuple[list[Any], Any, np.ndarray, np.ndarray]:
    """Check the inputs and say what is wrong in words; returns the overlap as int32 arrays."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown transfer strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    sources = [source] if hasattr(source, "shape") else list(source)
    if not sources:
        raise ValueError("source: expected at least one [source_vocab, dim] embedding matrix, got none")
    for i, s in enumerate(sources):
        if len(s.shape) != 2 or s.shape[0] != sources[0].shape[0]:
            raise ValueError(
                f"source[{i}]: expected a [source_vocab, dim] matrix with {sources[0].shape[0]} rows like "
                f"source[0], got shape {tuple(s.shape)}"
            )
    if isinstance(vocab, bool) or not isinstance(vocab, int | np.integer) or vocab < 1:
        raise ValueError(f"target_vocab_size must be a positive integer, got {vocab!r}")
    if block_size < 1 or top_k < 1 or omp_k < 1 or not temperature > 0:
        raise ValueError(
            f"block_size, top_k and omp_k must be >= 1 and temperature > 0, got block_size={block_size}, "
            f"top_k={top_k}, omp_k={omp_k}, temperature={temperature}"
        )
    if not min_mean_cos >= 0 or not max_norm_factor > 0:
        raise ValueError(f"min_mean_cos must be >= 0 and max_norm_factor > 0, got {min_mean_cos} and "
                         f"{max_norm_factor}")
    target = np.asarray(overlap_target)
    src = np.asarray(overlap_source)
    if target.ndim != 1 or src.ndim != 1 or target.shape != src.shape:
        raise ValueError(
            f"overlap_target and overlap_source must be 1-D arrays of equal length, got shapes "
            f"{target.shape} and {src.shape}"
        )
    if target.size and not (np.issubdtype(target.dtype, np.integer) and np.issubdtype(src.dtype, np.integer)):
        raise ValueError(f"overlap ids must be integers, got {target.dtype} and {src.dtype}")
    source_vocab = sources[0].shape[0]
    for name, ids, bound in (("overlap_target", target, vocab), ("overlap_source", src, source_vocab)):
        bad = ids[(ids < 0) | (ids >= bound)]
        if bad.size:
            raise ValueError(f"{name}: ids must lie in [0, {bound}), found {bad[:5].tolist()}")
    unique, counts = np.unique(target, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1][:5].tolist()
        raise ValueError(f"overlap_target: each target id may appear once, repeated: {repeated}")
    if not target.size and strategy in (*BLOCKED_STRATEGIES, "mean"):
        raise ClpError(
            f"strategy {strategy!r}: CLP needs tokens shared by the source and target vocabularies, but the "
            "overlap is empty; the 'random' and 'from-scratch' initialisations work without shared tokens"
        )
    if strategy in HELPER_STRATEGIES:
        if helper is None:
            raise ValueError(f"strategy {strategy!r} needs the helper model's input embedding [Vt, dim]")
        if len(helper.shape) != 2 or helper.shape[0] != vocab:
            raise ValueError(
                f"helper embedding: expected {vocab} rows (the target vocabulary), got {tuple(helper.shape)}"
            )
    return sources, helper, target.astype(np.int32), src.astype(np.int32)


def piece_table(pieces: Any, vocab: int, vocab_padded: int, source_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """FVT's pieces as [Vt_pad, P] indices into the unique source ids they use (-1 pads), and those ids."""
    if pieces is None:
        raise ValueError("strategy 'fvt' needs pieces: [target_vocab, P] source token ids (-1 pads)")
    pieces = np.asarray(pieces)
    if pieces.ndim != 2 or pieces.shape[0] != vocab or not np.issubdtype(pieces.dtype, np.integer):
        raise ValueError(f"pieces: expected an integer [{vocab}, P] matrix, got {pieces.dtype} {pieces.shape}")
    bad = pieces[(pieces < -1) | (pieces >= source_vocab)]
    if bad.size:
        raise ValueError(f"pieces: ids must lie in [0, {source_vocab}) or be -1, found {bad[:5].tolist()}")
    used = np.unique(pieces[pieces >= 0])
    table = np.full((vocab_padded, max(pieces.shape[1], 1)), -1, np.int32)
    table[:vocab, : pieces.shape[1]] = np.where(pieces >= 0, np.searchsorted(used, pieces), -1)
    return table, (used if used.size else np.zeros(1, np.int64)).astype(np.int32)
