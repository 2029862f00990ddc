"""The mixture iterator: deterministic per seed, exact resume from JSON state, shares, epochs, host sharding."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multihost_data_worker import BATCH, SEED, STEPS, make_mixture, make_tables

from clp_jax.data.iterator import MixtureIterator
from clp_jax.data.mixtures import Mixture, explicit_mixture
from clp_jax.errors import ClpError

SIZES = {"en": 40, "de": 24, "fr": 16}
WEIGHTS = {"en": 0.5, "de": 0.3, "fr": 0.2}


def iterator(seed=0, batch=8, index=0, count=1, sizes=SIZES, weights=WEIGHTS):
    return MixtureIterator(make_tables(sizes), explicit_mixture(sizes, weights), batch, seed, index, count)


def take(it, n):
    return [next(it) for _ in range(n)]


def row_ids(batch):
    """Identity of each row (1000 * source number + row), as written by make_tables."""
    return batch["tokens"][:, 0].tolist()


def same(a, b):
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def test_batches_are_dicts_of_int32_arrays_of_the_host_shape():
    batch = next(iterator(batch=8, index=1, count=2))
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    assert all(a.shape == (4, 6) and a.dtype == np.int32 for a in batch.values())
    assert np.array_equal(batch["positions"][0], np.arange(6))


def test_same_seed_same_batches_other_seed_different():
    a, b, c = take(iterator(seed=1), 6), take(iterator(seed=1), 6), take(iterator(seed=2), 6)
    assert same(a, b)
    assert not same(a, c)


def test_resume_from_json_state_repeats_an_uninterrupted_run():
    full = take(iterator(seed=3), 10)
    it = iterator(seed=3)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 4 and state["seed"] == 3 and sum(state["rows_drawn"].values()) == 4 * 8
    resumed = iterator(seed=3)
    resumed.set_state(state)
    assert same(take(resumed, 6), full[4:])
    replayed = iterator(seed=3)  # a state with only the step: rows drawn are recomputed from the seed
    replayed.set_state({"step": 4, "seed": 3})
    assert same(take(replayed, 6), full[4:])


def test_resume_on_a_different_number_of_hosts_gives_the_same_global_batches():
    full = take(iterator(seed=5), 7)
    it = iterator(seed=5)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    hosts = [iterator(seed=5, index=i, count=2) for i in range(2)]
    for h in hosts:
        h.set_state(state)
    for step in range(3, 7):
        parts = [next(h) for h in hosts]
        assert np.array_equal(np.concatenate([p["tokens"] for p in parts]), full[step]["tokens"])


def test_state_of_another_run_is_refused():
    state = iterator(seed=3).get_state()
    with pytest.raises(ClpError, match="seed 3, but this run has 4"):
        iterator(seed=4).set_state(state)
    with pytest.raises(ClpError, match="source_rows"):
        iterator(seed=3, sizes={"en": 41, "de": 24, "fr": 16}).set_state(state)
    with pytest.raises(ClpError, match="step"):
        iterator().set_state({"seed": 0})


def test_row_shares_approach_the_mixture_weights_and_counters_track_epochs():
    it = iterator(seed=7, batch=64)
    counts = dict.fromkeys(SIZES, 0)
    for batch in take(it, 150):
        for row in row_ids(batch):
            counts[list(SIZES)[row // 1000 - 1]] += 1
    total = sum(counts.values())
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] / total - weight) < 0.015, (name, counts[name] / total)
    counters = it.counters()
    assert {n: c["rows_drawn"] for n, c in counters.items()} == counts
    assert counters["fr"]["epochs"] == pytest.approx(counts["fr"] / SIZES["fr"])


def test_no_row_repeats_within_an_epoch_of_its_source():
    it = iterator(seed=9, batch=8)
    drawn = {n: [] for n in SIZES}
    for batch in take(it, 60):
        for row in row_ids(batch):
            drawn[list(SIZES)[row // 1000 - 1]].append(row % 1000)
    for name, rows in drawn.items():
        n = SIZES[name]
        epochs = [rows[i:i + n] for i in range(0, len(rows) - n + 1, n)]
        assert len(epochs) >= 3, name
        assert all(sorted(e) == list(range(n)) for e in epochs), name
        assert epochs[0] != epochs[1], "each epoch has its own order"


def test_zero_weight_source_is_never_drawn():
    sizes, weights = {"en": 30, "de": 30}, {"en": 1.0, "de": 0.0}
    rows = [r for b in take(iterator(batch=16, sizes=sizes, weights=weights), 20) for r in row_ids(b)]
    assert all(r // 1000 == 1 for r in rows)


@pytest.mark.parametrize("count", [2, 4])
def test_simulated_hosts_read_disjoint_rows_that_make_up_the_global_batch(count):
    sizes = {"en": 200, "de": 150, "fr": 100}  # larger than a batch: no source wraps inside one
    single = take(iterator(seed=2, batch=16, sizes=sizes), 5)
    hosts = [take(iterator(seed=2, batch=16, index=i, count=count, sizes=sizes), 5) for i in range(count)]
    for step, whole in enumerate(single):
        parts = [h[step] for h in hosts]
        assert all(len(p["tokens"]) == 16 // count for p in parts)
        ids = [set(row_ids(p)) for p in parts]
        assert sum(len(s) for s in ids) == len(set().union(*ids)) == 16, "disjoint rows"
        for k in whole:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ClpError, match="multiple of the 3 processes"):
        iterator(batch=8, index=0, count=3)
    with pytest.raises(ClpError, match="process_index"):
        iterator(index=2, count=2)
    with pytest.raises(ClpError, match="all mixture weights are zero"):
        MixtureIterator(make_tables(SIZES), Mixture(tuple(SIZES), (40.0, 24.0, 16.0), (0.0, 0.0, 0.0)), 8, 0, 0, 1)
    with pytest.raises(ClpError, match="'de' has no rows"):
        MixtureIterator(make_tables({"en": 10, "de": 0}), Mixture(("en", "de"), (10.0, 0.0), (0.5, 0.5)), 8, 0, 0, 1)
    with pytest.raises(ClpError, match="mixture is over sources"):
        MixtureIterator(make_tables({"en": 10}), explicit_mixture(SIZES, WEIGHTS), 8, 0, 0, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_jax_processes_read_disjoint_halves_of_the_single_process_batches(tmp_path):
    worker = Path(__file__).with_name("multihost_data_worker.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    outs = [tmp_path / f"host{i}.npz" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), "2", str(outs[i])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a jax.distributed worker did not finish in 180 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    results = [np.load(o) for o in outs]
    assert [int(r["process_index"]) for r in results] == [0, 1]
    assert all(int(r["process_count"]) == 2 and int(r["device_count"]) == 8 and int(r["local_device_count"]) == 4
               for r in results)
    assert all(r["global_shape"].tolist() == [BATCH, 6] and int(r["state_step"]) == STEPS for r in results)
    single = take(MixtureIterator(make_tables(), make_mixture(), BATCH, SEED, 0, 1), STEPS)
    for step, whole in enumerate(single):
        halves = [r["tokens"][step] for r in results]
        ids = [set(h[:, 0].tolist()) for h in halves]
        assert not ids[0] & ids[1], "hosts read disjoint rows"
        for k in whole:
            assert np.array_equal(np.concatenate([r[k][step] for r in results]), whole[k])
