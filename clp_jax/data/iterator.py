"""Step-indexed batches mixed from several row tables: deterministic for a seed, sharded over hosts, resumable.

Every host computes the same global batch k: each of its rows picks a source with probability equal to the
source's mixture weight, from a random stream keyed by (seed, k) alone; the c-th row drawn from a source is
row `perm_e[c % n]` of that source, with `perm_e` a permutation keyed by (seed, source, epoch e = c // n), so
no row repeats within an epoch of its source. Host i of P keeps rows [i * B/P, (i + 1) * B/P) of the global
batch. The state is the step and the rows drawn so far per source: a few integers, saved as JSON; restoring
it needs no seek, and the batches that follow equal those of an uninterrupted run, on any number of hosts.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from clp_jax.data.mixtures import Mixture
from clp_jax.errors import ClpError

STATE_VERSION = 1
_MIX_STREAM, _PERM_STREAM = 0, 1  # separate random streams for source choice and per-epoch permutations


def process_shard(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """(index, count) of this host: the given values, else JAX's `process_index()` and `process_count()`."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ClpError(f"process_index must be in [0, {process_count}), got {process_index}")
    return int(process_index), int(process_count)


def _check_tables(tables: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[tuple[str, ...], int, dict[str, int]]:
    """(array keys, seq_len, rows per source) of row tables that must agree in keys and row length."""
    keys: tuple[str, ...] | None = None
    seq_len: int | None = None
    rows: dict[str, int] = {}
    for name, table in tables.items():
        if keys is None:
            keys = tuple(table)
        if tuple(table) != keys:
            raise ClpError(f"source '{name}' has arrays {sorted(table)}, other sources have {sorted(keys)}")
        shapes = {k: np.shape(a) for k, a in table.items()}
        first = next(iter(shapes.values()))
        if len(first) != 2 or any(s != first for s in shapes.values()):
            raise ClpError(f"source '{name}': arrays must all be [rows, seq_len], found shapes {shapes}")
        if seq_len is not None and first[1] != seq_len:
            raise ClpError(f"source '{name}' has rows of {first[1]} tokens, other sources {seq_len}")
        seq_len = first[1]
        rows[name] = first[0]
    if keys is None or seq_len is None:
        raise ClpError("the iterator needs at least one source")
    return keys, seq_len, rows


class MixtureIterator:
    """Endless batches {name: [per_host_batch, seq_len]} mixed from row tables by a Mixture's weights."""

    def __init__(self, tables: Mapping[str, Mapping[str, np.ndarray]], mixture: Mixture, batch_size: int,
                 seed: int = 0, process_index: int | None = None, process_count: int | None = None) -> None:
        if set(tables) != set(mixture.names):
            raise ClpError(f"the mixture is over sources {', '.join(mixture.names)} but the data has "
                           f"{', '.join(tables) or 'none'}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ClpError(f"seed must be a non-negative integer, got {seed!r}")
        seed = int(seed)
        self.process_index, self.process_count = process_shard(process_index, process_count)
        if batch_size < 1 or batch_size % self.process_count:
            raise ClpError(f"global batch size {batch_size} must be a positive multiple of the "
                           f"{self.process_count} processes (hosts)")
        self.keys, self.seq_len, rows = _check_tables(tables)
        self.names = tuple(mixture.names)
        self.rows = np.array([rows[n] for n in self.names], dtype=np.int64)
        weights = np.asarray(mixture.weights, dtype=np.float64)
        for name, n, w in zip(self.names, self.rows, weights):
            if w > 0 and n == 0:
                raise ClpError(f"source '{name}' has no rows but its mixture weight is {w:g}")
        self._active = np.flatnonzero(weights > 0)
        if not len(self._active):
            raise ClpError(f"all mixture weights are zero (sources: {', '.join(self.names)})")
        cdf = np.cumsum(weights[self._active])
        self._cdf = cdf / cdf[-1]
        self.weights = weights / weights.sum()
        self.tables = {n: {k: tables[n][k] for k in self.keys} for n in self.names}  # read-only
        self._tables = list(self.tables.values())
        self._dtypes = {k: np.asarray(self._tables[0][k][:0]).dtype for k in self.keys}
        self._source_keys = [zlib.crc32(n.encode("utf-8")) for n in self.names]
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self.batch_size, self.seed = int(batch_size), seed
        self.per_host_batch = self.batch_size // self.process_count
        self.step = 0
        self.rows_drawn = np.zeros(len(self.names), dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def source_ids(self, step: int) -> np.ndarray:
        """Source index (into `names`) of each row of global batch `step`: a pure function of (seed, step)."""
        u = np.random.default_rng([_MIX_STREAM, self.seed, step]).random(self.batch_size)
        return self._active[np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self._active) - 1)]

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            for old in [k for k in self._perms if k[0] == source and k[1] < epoch - 1]:
                del self._perms[old]
            rng = np.random.default_rng([_PERM_STREAM, self.seed, self._source_keys[source], epoch])
            self._perms[key] = rng.permutation(int(self.rows[source]))
        return self._perms[key]

    def _row_indices(self, source: int, draws: np.ndarray) -> np.ndarray:
        """Table rows of a source's draws number `draws` (0, 1, ... since the start of training)."""
        n = int(self.rows[source])
        epochs, positions = np.divmod(draws, n)
        out = np.empty(len(draws), dtype=np.int64)
        for e in np.unique(epochs).tolist():
            where = epochs == e
            out[where] = self._permutation(source, e)[positions[where]]
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        sources = self.source_ids(self.step)
        draws = np.empty(self.batch_size, dtype=np.int64)  # per row: which draw of its source it is
        for s in np.unique(sources).tolist():
            where = np.flatnonzero(sources == s)
            draws[where] = self.rows_drawn[s] + np.arange(len(where))
        lo = self.process_index * self.per_host_batch
        mine, my_draws = sources[lo:lo + self.per_host_batch], draws[lo:lo + self.per_host_batch]
        batch = {k: np.empty((self.per_host_batch, self.seq_len), dtype=self._dtypes[k]) for k in self.keys}
        for s in np.unique(mine).tolist():
            where = np.flatnonzero(mine == s)
            rows = self._row_indices(s, my_draws[where])
            for k in self.keys:
                batch[k][where] = self._tables[s][k][rows]
        self.rows_drawn += np.bincount(sources, minlength=len(self.names))
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: the next step, the seed and rows drawn per source (with sizes, checked on restore)."""
        return {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "rows_drawn": dict(zip(self.names, self.rows_drawn.tolist())),
                "source_rows": dict(zip(self.names, self.rows.tolist()))}

    def rows_drawn_before(self, step: int) -> np.ndarray:
        """Rows drawn per source by steps 0 .. step - 1, recomputed from the seed (O(step) replay)."""
        drawn = np.zeros(len(self.names), dtype=np.int64)
        for k in range(step):
            drawn += np.bincount(self.source_ids(k), minlength=len(self.names))
        return drawn

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `get_state()` of a run on the same data; without `rows_drawn`, replay from the seed."""
        if state.get("version", STATE_VERSION) != STATE_VERSION:
            raise ClpError(f"data iterator state has version {state.get('version')}, expected {STATE_VERSION}")
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise ClpError(f"data iterator state needs a non-negative integer 'step', found {state.get('step')!r}")
        for key, ours in (("seed", self.seed), ("batch_size", self.batch_size),
                          ("source_rows", dict(zip(self.names, self.rows.tolist())))):
            if key in state and state[key] != ours:
                raise ClpError(f"data iterator state has {key} {state[key]}, but this run has {ours}: "
                               "resuming would not repeat the interrupted run's batches")
        if "rows_drawn" in state:
            drawn = state["rows_drawn"]
            if not isinstance(drawn, Mapping) or set(drawn) != set(self.names):
                raise ClpError(f"data iterator state counts rows of sources {sorted(drawn)}, this run has "
                               f"{sorted(self.names)}")
            self.rows_drawn = np.array([int(drawn[n]) for n in self.names], dtype=np.int64)
        else:
            self.rows_drawn = self.rows_drawn_before(state["step"])
        self.step = state["step"]
        self._perms.clear()

    def counters(self) -> dict[str, dict[str, float]]:
        """Per source: rows drawn so far (all hosts together), epochs that makes, and the observed share."""
        total = max(int(self.rows_drawn.sum()), 1)
        return {n: {"rows_drawn": int(d), "epochs": float(d / r) if r else 0.0, "share": float(d / total)}
                for n, d, r in zip(self.names, self.rows_drawn.tolist(), self.rows.tolist())}
