"""One process of the two-process data test: joins jax.distributed on CPU, writes its batches to an .npz file.

Usage: python multihost_data_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz (JAX_PLATFORMS=cpu, 4 host devices).
"""

import sys

import numpy as np

from clp_jax.data.mixtures import explicit_mixture

SIZES = {"en": 60, "de": 40, "fr": 25}
WEIGHTS = {"en": 0.5, "de": 0.3, "fr": 0.2}
SEQ_LEN, BATCH, SEED, STEPS = 6, 8, 11, 5


def make_tables(sizes=SIZES, seq_len=SEQ_LEN):
    """Row tables whose every token is the row's identity: 1000 * (source number + 1) + row."""
    tables = {}
    for i, (name, n) in enumerate(sizes.items()):
        ids = (1000 * (i + 1) + np.arange(n, dtype=np.int32))[:, None]
        tokens = np.repeat(ids, seq_len, axis=1)
        positions = np.tile(np.arange(seq_len, dtype=np.int32), (n, 1))
        tables[name] = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": positions}
    return tables


def make_mixture(sizes=SIZES, weights=WEIGHTS):
    return explicit_mixture(sizes, weights)


def main(port: int, process_id: int, num_processes: int, out: str) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
    from clp_jax.data.iterator import MixtureIterator
    from clp_jax.sharding import batch_sharding, make_mesh

    it = MixtureIterator(make_tables(), make_mixture(), BATCH, SEED)  # host from jax.process_index()/count()
    batches = [next(it) for _ in range(STEPS)]
    mesh = make_mesh(data=-1)  # every device of every process
    sharding = batch_sharding(mesh, (BATCH, SEQ_LEN))
    global_tokens = jax.make_array_from_process_local_data(sharding, batches[-1]["tokens"])
    np.savez(out, process_index=jax.process_index(), process_count=jax.process_count(),
             device_count=jax.device_count(), local_device_count=jax.local_device_count(),
             global_shape=np.array(global_tokens.shape), state_step=it.get_state()["step"],
             **{k: np.stack([b[k] for b in batches]) for k in batches[0]})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
