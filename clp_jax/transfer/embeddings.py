"""Target-vocabulary embeddings from a source model: CLP-Transfer and its baselines, sharded along vocab.

A target token that also exists in the source vocabulary (an overlap token) gets its source row
copied bit for bit. Every other ("missing") token i gets, by strategy:

- ``clp``: ``sum_j w_ij S[src(j)]`` over overlap tokens j, ``w_ij = cos(H_i, H_j) / sum_k cos(H_i, H_k)``
  in the helper embedding space H (Ostendorff & Rehm 2023);
- ``clp-topk``: softmax(cos / temperature) over the ``top_k`` most similar overlap tokens (WECHSEL-style);
- ``clp-sparsemax``: sparsemax(cos / temperature) over all overlap tokens (FOCUS / CLP+ style);
- ``mean``: the mean of the overlapping source rows;
- ``overlap``: a random row as in ``random``.

``random`` draws every row, overlap tokens included, from Normal(mean_d, std_d) of the source matrix's
columns. For the ``clp*`` strategies a row whose helper row is all zero or not finite, or (``clp``) whose
cosine sum is not positive and finite, is *degenerate* and gets the mean of the overlapping source rows.
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

from clp_jax.errors import ClpError
from clp_jax.sharding import LOGICAL_AXIS_RULES, logical_to_spec, named_sharding
from clp_jax.transfer.weights import block_embeddings, clp_factors, unit_rows

STRATEGIES = ("clp", "clp-topk", "clp-sparsemax", "random", "mean", "overlap")
HELPER_STRATEGIES = ("clp", "clp-topk", "clp-sparsemax")
FALLBACK = "mean of the overlapping source rows"


@dataclass(frozen=True)
class TransferStats:
    """What ``init_target_embeddings`` did: overlap size, degenerate rows and the strategy's parameters."""

    strategy: str
    n_overlap: int
    n_missing: int
    n_degenerate: int
    degenerate_target_ids: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Layout:
    """Static shapes of one transfer: the row-padded target vocab split into shards of missing-row blocks."""

    strategy: str
    mesh: Mesh
    vocab: int
    vocab_padded: int
    source_shapes: tuple[tuple[int, int], ...]
    helper_shape: tuple[int, int] | None
    row_axes: Any
    block: int
    missing_per_shard: int
    n_overlap: int
    dtypes: tuple[Any, ...]
    top_k: int
    temperature: float
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
) -> tuple[tuple[jax.Array, ...], TransferStats]:
    """Target embeddings [Vt, D_i] for each source matrix [Vs, D_i], one set of weights for all, in its dtype.

    ``source`` holds matrices that share rows, e.g. the input embedding and an untied lm_head as [Vs, D].
    ``helper`` is used by the ``clp*`` strategies only. Returns the arrays laid out by the rules table,
    ``named_sharding(("vocab", "embed"), (Vt, D_i), mesh)``: rows sharded when Vt divides the vocab mesh
    axes, otherwise the table's fallback (columns over ``fsdp``, or replicated). With ``padded=True`` they
    are [Vt_pad, D_i], Vt_pad the next multiple of the vocab mesh axes, always row-sharded, rows >= Vt zero.
    """
    sources, helper, overlap_target, overlap_source = _validate(
        strategy, source, helper, overlap_target, overlap_source, target_vocab_size, block_size, top_k,
        temperature,
    )
    n = overlap_target.size
    k = min(top_k, n)
    shards = math.prod(mesh.shape[a] for a in LOGICAL_AXIS_RULES["vocab"])
    vocab_padded = -(-target_vocab_size // shards) * shards
    row_axes = logical_to_spec(("vocab", "embed"), (vocab_padded, 1), mesh)[0]
    position = np.full(vocab_padded, -1, np.int32)
    position[overlap_target] = np.arange(n, dtype=np.int32)
    missing_local, per_shard, block = _missing_blocks(position, target_vocab_size, shards, block_size)
    layout = _Layout(
        strategy, mesh, target_vocab_size, vocab_padded,
        tuple((int(s.shape[0]), int(s.shape[1])) for s in sources),
        tuple(int(d) for d in helper.shape) if strategy in HELPER_STRATEGIES else None,
        row_axes, block, per_shard, n, tuple(jnp.dtype(s.dtype) for s in sources), k, float(temperature), padded,
    )
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
    inputs = jax.device_put(inputs, _input_shardings(layout))
    outputs, degenerate = _compiled(layout)(inputs)
    degenerate_ids = np.flatnonzero(np.asarray(degenerate)[:target_vocab_size])
    params: dict[str, Any] = {"fallback": FALLBACK} if strategy in (*HELPER_STRATEGIES, "mean") else {}
    if strategy in HELPER_STRATEGIES:
        params["block_size"] = block
    if strategy == "clp-topk":
        params.update(top_k=k, temperature=float(temperature))
    if strategy == "clp-sparsemax":
        params["temperature"] = float(temperature)
    if strategy in ("random", "overlap"):
        params["seed"] = int(seed)
    stats = TransferStats(
        strategy, n, target_vocab_size - n, int(degenerate_ids.size), degenerate_ids, params,
    )
    return tuple(outputs), stats


def _validate(
    strategy: str, source: Any, helper: Any, overlap_target: Any, overlap_source: Any, vocab: int,
    block_size: int, top_k: int, temperature: float,
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
    if block_size < 1 or top_k < 1 or not temperature > 0:
        raise ValueError(
            f"block_size and top_k must be >= 1 and temperature > 0, got block_size={block_size}, "
            f"top_k={top_k}, temperature={temperature}"
        )
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
    if not target.size and strategy in (*HELPER_STRATEGIES, "mean"):
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
    return shardings


@lru_cache(maxsize=64)
def _compiled(layout: _Layout) -> Any:
    """The jitted transfer for one layout: global gathers, then a per-shard kernel over row blocks."""
    mesh, rows_spec = layout.mesh, PartitionSpec(layout.row_axes)
    replicated = NamedSharding(mesh, PartitionSpec())
    out_rows = layout.vocab_padded if layout.padded else layout.vocab
    out_shardings = (
        tuple(named_sharding(("vocab", "embed"), (out_rows, w), mesh) for w in layout.widths),
        NamedSharding(mesh, rows_spec),
    )

    def run(x: dict[str, Any]) -> tuple[tuple[jax.Array, ...], jax.Array]:
        overlap = jnp.concatenate([s[x["overlap_source"]].astype(jnp.float32) for s in x["sources"]], axis=1)
        overlap = jax.lax.with_sharding_constraint(overlap, replicated)
        shared = {"overlap": overlap, "fallback": jnp.mean(overlap, axis=0), "seed": x["seed"]}
        if layout.strategy in ("random", "overlap"):
            stats = [_column_stats(s) for s in x["sources"]]
            shared["col_mean"] = jnp.concatenate([m for m, _ in stats])
            shared["col_std"] = jnp.concatenate([s for _, s in stats])
        local = {k: x[k] for k in ("position", "missing", "rows")}
        if "helper" in x:
            pad = layout.vocab_padded - layout.vocab
            local["helper"] = jnp.pad(x["helper"], ((0, pad), (0, 0)))
            overlap_helper = unit_rows(x["helper"][x["overlap_target"]])[0]
            if layout.strategy == "clp":
                shared["projection"], shared["direction_sum"] = clp_factors(overlap_helper, overlap)
            else:
                shared["overlap_helper"] = overlap_helper
        specs = {k: PartitionSpec(layout.row_axes, None) if k == "helper" else rows_spec for k in local}
        kernel = jax.shard_map(
            partial(_shard_kernel, layout), mesh=mesh,
            in_specs=(specs, jax.tree.map(lambda _: PartitionSpec(), shared)),
            out_specs=(tuple(PartitionSpec(layout.row_axes, None) for _ in layout.widths), rows_spec),
            check_vma=False,
        )
        outputs, degenerate = kernel(local, shared)
        if not layout.padded:
            outputs = tuple(o[: layout.vocab] for o in outputs)
        return outputs, degenerate

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
    """One shard's rows: copy overlap rows, then fill missing rows block by block (or randomly)."""
    position, row_ids = local["position"], local["rows"]
    overlap = shared["overlap"]
    is_overlap = (position >= 0)[:, None]
    if layout.n_overlap:
        copied = jnp.where(is_overlap, overlap[jnp.maximum(position, 0)], 0.0)
    else:
        copied = jnp.zeros((position.size, overlap.shape[1]), jnp.float32)
    valid = (row_ids < layout.vocab)[:, None]
    degenerate = jnp.zeros(position.shape, bool)
    if layout.strategy == "mean":
        filled = jnp.where(is_overlap, copied, jnp.where(valid, shared["fallback"], 0.0))
        return tuple(_split(filled, layout)), degenerate
    if layout.strategy in ("random", "overlap"):
        noise = _row_noise(shared["seed"], row_ids, layout.widths)
        random_rows = jnp.where(valid, shared["col_mean"] + shared["col_std"] * noise, 0.0)
        filled = random_rows if layout.strategy == "random" else jnp.where(is_overlap, copied, random_rows)
        return tuple(_split(filled, layout)), degenerate

    helper = local["helper"]
    blocks = local["missing"].reshape(-1, layout.block)
    last = helper.shape[0] - 1

    def step(carry: Any, index: jax.Array) -> tuple[Any, None]:
        outputs, flags = carry
        rows, flag = block_embeddings(
            layout.strategy, helper[jnp.minimum(index, last)], shared, layout.top_k, layout.temperature
        )
        outputs = tuple(o.at[index].set(r, mode="drop") for o, r in zip(outputs, _split(rows, layout), strict=True))
        return (outputs, flags.at[index].set(flag, mode="drop")), None

    (outputs, degenerate), _ = jax.lax.scan(step, (tuple(_split(copied, layout)), degenerate), blocks)
    return outputs, degenerate


def _row_noise(seed: jax.Array, row_ids: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """Standard normal noise [rows, sum(widths)], one key per (matrix, global row): mesh-independent."""
    key = jax.random.key(seed)
    parts = []
    for m, width in enumerate(widths):
        matrix_key = jax.random.fold_in(key, m)
        draw = partial(lambda k, w, r: jax.random.normal(jax.random.fold_in(k, r), (w,)), matrix_key, width)
        parts.append(jax.vmap(draw)(row_ids))
    return jnp.concatenate(parts, axis=1)
