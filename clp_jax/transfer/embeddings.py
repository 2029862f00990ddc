"""Target-vocabulary embeddings from a source model: CLP-Transfer and its baselines, sharded along vocab.

A target token that also exists in the source vocabulary (an overlap token) gets its source row
copied bit for bit. Every other ("missing") token i gets, by strategy:

- ``clp``: ``sum_j w_ij S[src(j)]`` over overlap tokens j, ``w_ij = cos(H_i, H_j) / sum_k cos(H_i, H_k)``
  in the helper embedding space H (Ostendorff & Rehm 2023);
- ``clp-topk``: softmax(cos / temperature) over the ``top_k`` most similar overlap tokens (WECHSEL-style);
- ``clp-sparsemax``: sparsemax(cos / temperature) over all overlap tokens (FOCUS / CLP+ style);
- ``omp``: the coefficients of H_i's orthogonal matching pursuit over ``omp_k`` overlap helper rows,
  applied to their source rows;
- ``fvt``: the mean of the source rows of the pieces the source tokenizer splits the token's text into
  (Fast Vocabulary Transfer, Gee et al. 2022; ``pieces`` comes from ``align.fvt_pieces``);
- ``mean``: the mean of the overlapping source rows;
- ``overlap``: a random row as in ``random``.

``random`` draws every row, overlap tokens included, from Normal(mean_d, std_d) of the source matrix's
columns. ``center_helper`` subtracts the mean helper row of the overlap tokens before any similarity.

Ill-conditioned rows get the fallback (the mean of the overlapping source rows; for ``random`` and
``overlap`` the mean of all source rows) and are counted by reason: ``zero_helper`` (helper row zero or not
finite), ``cos_sum`` (``clp``: cosine sum not above ``min_mean_cos`` x overlap, or not finite), ``no_pieces``
(``fvt``: the text encodes to no source token) and, for every strategy, ``norm`` (a row longer than
``max_norm_factor`` x the longest source row of its matrix, or not finite). ``match_norms`` then rescales
every computed row to the mean row norm of the reference rows (those the fallback averages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clp_jax.sharding import LOGICAL_AXIS_RULES, logical_to_spec, named_sharding
from clp_jax.transfer.block_rows import (
    REASONS,
    BlockOptions,
    block_embeddings,
    clp_factors,
    condition_rows,
    fvt_block,
    segment_norms,
    unit_rows,
)
from clp_jax.transfer.validate import (
    BLOCKED_STRATEGIES,
    HELPER_STRATEGIES,
    MAX_NORM_FACTOR,
    MIN_MEAN_COS,
    piece_table,
    validate_inputs,
)
from clp_jax.transfer.validate import STRATEGIES as STRATEGIES  # re-exported for callers

FALLBACK = "mean of the overlapping source rows"
RANDOM_FALLBACK = "mean of all source rows"
RULE = ("a computed row is ill-conditioned when its helper row is zero or not finite (zero_helper); for clp, "
        "when sum_j cos(h_i, h_j) <= min_mean_cos x overlap or is not finite (cos_sum); for fvt, when its text "
        "encodes to no source token (no_pieces); for every strategy, when it is longer than max_norm_factor x "
        "the longest source row of its matrix or not finite (norm). Each such row gets the fallback.")


@dataclass(frozen=True)
class TransferStats:
    """What ``init_target_embeddings`` did: overlap size, fallback rows by reason, options and row norms.

    ``n_degenerate`` / ``degenerate_target_ids`` cover every reason; ``reasons`` counts them one by one.
    Row-norm stats are one ``{"min", "mean", "max"}`` dict per source matrix, None where no row exists.
    """

    strategy: str
    n_overlap: int
    n_missing: int
    n_degenerate: int
    degenerate_target_ids: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    reason_target_ids: dict[str, np.ndarray] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    source_row_norms: tuple[dict, ...] = ()
    computed_row_norms: tuple[dict, ...] = ()


@dataclass(frozen=True)
class _Layout:
    """Static shapes of one transfer: the row-padded target vocab split into shards of missing-row blocks."""

    strategy: str
    mesh: Mesh
    vocab: int
    vocab_padded: int
    source_shapes: tuple[tuple[int, int], ...]
    helper_shape: tuple[int, int] | None
    pieces_width: int
    row_axes: Any
    block: int
    missing_per_shard: int
    n_overlap: int
    dtypes: tuple[Any, ...]
    opts: BlockOptions
    max_norm_factor: float
    match_norms: bool
    padded: bool

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(shape[1] for shape in self.source_shapes)


def init_target_embeddings(
    strategy: str,
    source: Sequence[jax.Array | np.ndarray],
    helper: jax.Array | np.ndarray | None,
    overlap_target: np.ndarray,
    overlap_source: np.ndarray,
    target_vocab_size: int,
    *,
    mesh: Mesh,
    seed: int = 0,
    block_size: int = 1024,
    top_k: int = 10,
    temperature: float = 0.1,
    padded: bool = False,
    pieces: np.ndarray | None = None,
    center_helper: bool = False,
    omp_k: int = 64,
    match_norms: bool = False,
    min_mean_cos: float = MIN_MEAN_COS,
    max_norm_factor: float = MAX_NORM_FACTOR,
) -> tuple[tuple[jax.Array, ...], TransferStats]:
    """Target embeddings [Vt, D_i] for each source matrix [Vs, D_i], one set of weights for all, in its dtype.

    ``source`` holds matrices that share rows, e.g. the input embedding and an untied lm_head as [Vs, D].
    ``helper`` is used by the helper strategies (clp*, omp) only, ``pieces`` ([Vt, P] source ids, -1 pads) by
    ``fvt`` only. Returns the arrays laid out by the rules table,
    ``named_sharding(("vocab", "embed"), (Vt, D_i), mesh)``: rows sharded when Vt divides the vocab mesh
    axes, otherwise the table's fallback (columns over ``fsdp``, or replicated). With ``padded=True`` they
    are [Vt_pad, D_i], Vt_pad the next multiple of the vocab mesh axes, always row-sharded, rows >= Vt zero.
    """
    sources, helper, overlap_target, overlap_source = validate_inputs(
        strategy, source, helper, overlap_target, overlap_source, target_vocab_size, block_size, top_k,
        temperature, omp_k, min_mean_cos, max_norm_factor,
    )
    n = overlap_target.size
    opts = BlockOptions(min(top_k, n), float(temperature), min(omp_k, n), float(min_mean_cos) * n,
                        bool(center_helper))
    shards = math.prod(mesh.shape[a] for a in LOGICAL_AXIS_RULES["vocab"])
    vocab_padded = -(-target_vocab_size // shards) * shards
    row_axes = logical_to_spec(("vocab", "embed"), (vocab_padded, 1), mesh)[0]
    position = np.full(vocab_padded, -1, np.int32)
    position[overlap_target] = np.arange(n, dtype=np.int32)
    missing_local, per_shard, block = _missing_blocks(position, target_vocab_size, shards, block_size)
    inputs = {
        "sources": tuple(sources),
        "position": position,
        "missing": missing_local,
        "rows": np.arange(vocab_padded, dtype=np.int32),
        "overlap_target": overlap_target,
        "overlap_source": overlap_source,
        "seed": np.asarray(seed % 2**32, np.uint32),
    }
    if strategy in HELPER_STRATEGIES:
        inputs["helper"] = helper
    if strategy == "fvt":
        inputs["pieces"], inputs["piece_source"] = piece_table(pieces, target_vocab_size, vocab_padded,
                                                               sources[0].shape[0])
    layout = _Layout(
        strategy, mesh, target_vocab_size, vocab_padded,
        tuple((int(s.shape[0]), int(s.shape[1])) for s in sources),
        tuple(int(d) for d in helper.shape) if strategy in HELPER_STRATEGIES else None,
        int(inputs["pieces"].shape[1]) if strategy == "fvt" else 0,
        row_axes, block, per_shard, n, tuple(jnp.dtype(s.dtype) for s in sources), opts,
        float(max_norm_factor), bool(match_norms), padded,
    )
    inputs = jax.device_put(inputs, _input_shardings(layout))
    outputs, reason, norms = _compiled(layout)(inputs)
    stats = _stats(layout, np.asarray(reason)[:target_vocab_size], np.asarray(norms), seed, float(min_mean_cos))
    return tuple(outputs), stats


def _stats(layout: _Layout, reason: np.ndarray, norms: np.ndarray, seed: int, min_mean_cos: float) -> TransferStats:
    """The host-side summary of one transfer: fallback rows by reason, parameters and row-norm stats."""
    strategy, opts = layout.strategy, layout.opts
    degenerate_ids = np.flatnonzero(reason)
    by_reason = {name: np.flatnonzero(reason == code) for code, name in enumerate(REASONS, start=1)}
    params: dict[str, Any] = {"fallback": FALLBACK} if strategy in (*BLOCKED_STRATEGIES, "mean") else {}
    if strategy in BLOCKED_STRATEGIES:
        params["block_size"] = layout.block
    if strategy in HELPER_STRATEGIES:
        params["center_helper"] = opts.center_helper
    if strategy == "clp":
        params["min_mean_cos"] = min_mean_cos
    if strategy == "clp-topk":
        params.update(top_k=opts.top_k, temperature=opts.temperature)
    if strategy == "clp-sparsemax":
        params["temperature"] = opts.temperature
    if strategy == "omp":
        params["omp_k"] = opts.omp_k
    if strategy == "fvt":
        params["max_pieces"] = layout.pieces_width
    if strategy in ("random", "overlap"):
        params["seed"] = int(seed)
    checks = {"max_norm_factor": layout.max_norm_factor, "match_norms": layout.match_norms,
              "fallback": RANDOM_FALLBACK if strategy in ("random", "overlap") else FALLBACK}
    return TransferStats(
        strategy, layout.n_overlap, layout.vocab - layout.n_overlap, int(degenerate_ids.size), degenerate_ids,
        params, {name: int(ids.size) for name, ids in by_reason.items()}, by_reason, checks,
        _norm_dicts(norms[0]), _norm_dicts(norms[1]),
    )


def _norm_dicts(stats: np.ndarray) -> tuple[dict, ...]:
    """[M, 3] (min, mean, max) rows as JSON-friendly dicts; NaN (no rows) becomes None."""
    return tuple({k: (float(v) if np.isfinite(v) else None) for k, v in zip(("min", "mean", "max"), row)}
                 for row in stats)


def _missing_blocks(
    position: np.ndarray, vocab: int, shards: int, block_size: int
) -> tuple[np.ndarray, int, int]:
    """Local row ids of each shard's missing tokens, padded (with an out-of-range id) to whole blocks."""
    rows_per_shard = position.size // shards
    missing = np.flatnonzero(position[:vocab] < 0)
    shard = missing // rows_per_shard
    counts = np.bincount(shard, minlength=shards)
    most = int(counts.max()) if missing.size else 0
    block = max(1, min(block_size, most))
    per_shard = -(-most // block) * block
    local = np.full((shards, per_shard), rows_per_shard, np.int32)
    slot = np.arange(missing.size) - np.concatenate([[0], np.cumsum(counts)[:-1]])[shard]
    local[shard, slot] = missing % rows_per_shard
    return local.reshape(-1), per_shard, block


def _input_shardings(layout: _Layout) -> dict[str, Any]:
    """The rules table's layout for each input: matrices by ("vocab", "embed"), row indices by vocab."""
    mesh = layout.mesh
    rows = NamedSharding(mesh, PartitionSpec(layout.row_axes))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {
        "sources": tuple(named_sharding(("vocab", "embed"), shape, mesh) for shape in layout.source_shapes),
        "position": rows, "missing": rows, "rows": rows,
        "overlap_target": replicated, "overlap_source": replicated, "seed": replicated,
    }
    if layout.helper_shape is not None:
        helper = named_sharding(("vocab", "embed"), layout.helper_shape, mesh)
        # Rows that do not divide the vocab axes: start replicated, so padding can shard rows locally.
        shardings["helper"] = helper if helper.spec[0] == layout.row_axes else replicated
    if layout.strategy == "fvt":
        shardings["pieces"] = NamedSharding(mesh, PartitionSpec(layout.row_axes, None))
        shardings["piece_source"] = replicated
    return shardings


def _rows_of(sources: Sequence[jax.Array], ids: jax.Array, mesh: Mesh) -> jax.Array:
    """The given source rows of every matrix, side by side in float32, replicated on the mesh."""
    rows = jnp.concatenate([s[ids].astype(jnp.float32) for s in sources], axis=1)
    return jax.lax.with_sharding_constraint(rows, NamedSharding(mesh, PartitionSpec()))


def _norm_stats(norms: Sequence[jax.Array], mask: jax.Array) -> jax.Array:
    """(min, mean, max) of each matrix's row norms over ``mask`` -> [M, 3]; NaN where the mask is empty."""
    count = jnp.sum(mask)
    nan = jnp.float32(jnp.nan)

    def one(n: jax.Array) -> jax.Array:
        low = jnp.min(jnp.where(mask, n, jnp.inf))
        high = jnp.max(jnp.where(mask, n, -jnp.inf))
        mean = jnp.sum(jnp.where(mask, n, 0.0)) / jnp.maximum(count, 1)
        return jnp.where(count > 0, jnp.stack([low, mean, high]), nan)

    return jnp.stack([one(n) for n in norms])


def _shared_inputs(layout: _Layout, x: dict[str, Any], source_norms: list[jax.Array]) -> dict[str, jax.Array]:
    """Replicated float32 inputs of the kernel: overlap rows, fallback, norm bounds, helper factors."""
    overlap = _rows_of(x["sources"], x["overlap_source"], layout.mesh)
    shared = {"overlap": overlap, "seed": x["seed"]}
    if layout.strategy in ("random", "overlap"):
        stats = [_column_stats(s) for s in x["sources"]]
        shared["col_mean"] = jnp.concatenate([m for m, _ in stats])
        shared["col_std"] = jnp.concatenate([s for _, s in stats])
        shared["fallback"] = shared["col_mean"]
        shared["target_norm"] = jnp.stack([jnp.mean(n) for n in source_norms])
    else:
        shared["fallback"] = jnp.mean(overlap, axis=0)
        shared["target_norm"] = jnp.mean(segment_norms(overlap, layout.widths), axis=0)
    shared["norm_cap"] = layout.max_norm_factor * jnp.stack([jnp.max(n) for n in source_norms])
    if layout.strategy == "fvt":
        shared["table"] = _rows_of(x["sources"], x["piece_source"], layout.mesh)
    if "helper" in x:
        overlap_helper = x["helper"][x["overlap_target"]].astype(jnp.float32)
        shared["helper_mean"] = jnp.mean(overlap_helper, axis=0)
        if layout.opts.center_helper:
            overlap_helper = overlap_helper - shared["helper_mean"]
        units = unit_rows(overlap_helper)[0]
        if layout.strategy == "clp":
            shared["projection"], shared["direction_sum"] = clp_factors(units, overlap)
        else:
            shared["overlap_helper"] = units
        if layout.strategy == "omp":
            shared["overlap_atoms"] = overlap_helper
    return shared


@lru_cache(maxsize=64)
def _compiled(layout: _Layout) -> Any:
    """The jitted transfer for one layout: global gathers, then a per-shard kernel over row blocks."""
    mesh, rows_spec = layout.mesh, PartitionSpec(layout.row_axes)
    replicated = NamedSharding(mesh, PartitionSpec())
    out_rows = layout.vocab_padded if layout.padded else layout.vocab
    out_shardings = (
        tuple(named_sharding(("vocab", "embed"), (out_rows, w), mesh) for w in layout.widths),
        NamedSharding(mesh, rows_spec),
        replicated,
    )

    def run(x: dict[str, Any]) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
        source_norms = [jnp.sqrt(jnp.sum(jnp.square(s.astype(jnp.float32)), axis=1)) for s in x["sources"]]
        shared = _shared_inputs(layout, x, source_norms)
        local = {k: x[k] for k in ("position", "missing", "rows", "pieces") if k in x}
        if "helper" in x:
            local["helper"] = jnp.pad(x["helper"], ((0, layout.vocab_padded - layout.vocab), (0, 0)))
        matrix = PartitionSpec(layout.row_axes, None)
        specs = {k: matrix if k in ("helper", "pieces") else rows_spec for k in local}
        kernel = jax.shard_map(
            partial(_shard_kernel, layout), mesh=mesh,
            in_specs=(specs, jax.tree.map(lambda _: PartitionSpec(), shared)),
            out_specs=(tuple(matrix for _ in layout.widths), rows_spec),
            check_vma=False,
        )
        outputs, reason = kernel(local, shared)
        outputs = tuple(o[: layout.vocab] for o in outputs) if not layout.padded else outputs
        computed = x["position"][: layout.vocab] < 0
        if layout.strategy == "random":
            computed = jnp.ones_like(computed)
        out_norms = [jnp.sqrt(jnp.sum(jnp.square(o[: layout.vocab].astype(jnp.float32)), axis=1)) for o in outputs]
        everything = jnp.ones(layout.source_shapes[0][0], bool)
        norms = jnp.stack([_norm_stats(source_norms, everything), _norm_stats(out_norms, computed)])
        return outputs, reason, norms

    return jax.jit(run, in_shardings=(_input_shardings(layout),), out_shardings=out_shardings)


def _column_stats(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-dimension mean and (population) standard deviation of a source matrix, in float32."""
    s = s.astype(jnp.float32)
    mean = jnp.mean(s, axis=0)
    return mean, jnp.sqrt(jnp.mean(jnp.square(s - mean), axis=0))


def _split(rows: jax.Array, layout: _Layout) -> list[jax.Array]:
    """Cut concatenated float32 columns back into one array per source matrix, each in its dtype."""
    offsets = np.cumsum((0,) + layout.widths)
    return [rows[..., a:b].astype(dt) for a, b, dt in zip(offsets[:-1], offsets[1:], layout.dtypes, strict=True)]


def _shard_kernel(layout: _Layout, local: dict[str, jax.Array], shared: dict[str, jax.Array]) -> Any:
    """One shard's rows: copy overlap rows, then fill missing rows block by block (or all at once), checked."""
    position, row_ids = local["position"], local["rows"]
    overlap = shared["overlap"]
    is_overlap = (position >= 0)[:, None]
    if layout.n_overlap:
        copied = jnp.where(is_overlap, overlap[jnp.maximum(position, 0)], 0.0)
    else:
        copied = jnp.zeros((position.size, overlap.shape[1]), jnp.float32)
    valid = row_ids < layout.vocab
    if layout.strategy not in BLOCKED_STRATEGIES:
        if layout.strategy == "mean":
            rows = jnp.broadcast_to(shared["fallback"], copied.shape)
        else:
            noise = _row_noise(shared["seed"], row_ids, layout.widths)
            rows = shared["col_mean"] + shared["col_std"] * noise
        rows, reason = condition_rows(rows, jnp.zeros(position.shape, jnp.int8), shared, layout.widths,
                                      layout.match_norms)
        keep = is_overlap[:, 0] & (layout.strategy != "random")
        filled = jnp.where(valid[:, None], jnp.where(keep[:, None], copied, rows), 0.0)
        return tuple(_split(filled, layout)), jnp.where(valid & ~keep, reason, 0).astype(jnp.int8)

    source = local["helper"] if layout.strategy in HELPER_STRATEGIES else local["pieces"]
    blocks = local["missing"].reshape(-1, layout.block)
    last = source.shape[0] - 1

    def step(carry: Any, index: jax.Array) -> tuple[Any, None]:
        outputs, reasons = carry
        block = source[jnp.minimum(index, last)]
        if layout.strategy == "fvt":
            rows, reason = fvt_block(block, shared["table"])
        else:
            rows, reason = block_embeddings(layout.strategy, block, shared, layout.opts)
        rows, reason = condition_rows(rows, reason, shared, layout.widths, layout.match_norms)
        outputs = tuple(o.at[index].set(r, mode="drop") for o, r in zip(outputs, _split(rows, layout), strict=True))
        return (outputs, reasons.at[index].set(reason, mode="drop")), None

    init = (tuple(_split(copied, layout)), jnp.zeros(position.shape, jnp.int8))
    (outputs, reasons), _ = jax.lax.scan(step, init, blocks)
    return outputs, reasons


def _row_noise(seed: jax.Array, row_ids: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """Standard normal noise [rows, sum(widths)], one key per (matrix, global row): mesh-independent."""
    key = jax.random.key(seed)
    parts = []
    for m, width in enumerate(widths):
        matrix_key = jax.random.fold_in(key, m)
        draw = partial(lambda k, w, r: jax.random.normal(jax.random.fold_in(k, r), (w,)), matrix_key, width)
        parts.append(jax.vmap(draw)(row_ids))
    return jnp.concatenate(parts, axis=1)
