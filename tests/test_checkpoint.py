"""Checkpointer: bit-identical round trips, interval/keep, async saves, resharding, broken steps, SIGTERM."""

import logging
import os
import shutil
import signal
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clp_jax.errors import ClpError
from clp_jax.sharding import make_mesh, tree_shardings
from clp_jax.train.checkpoint import CheckpointConfig, Checkpointer, state_checksum

LOGGER = "clp_jax.train.checkpoint"


@flax.struct.dataclass
class TinyState:
    step: jax.Array
    params: dict
    opt_state: dict


def make_state(mesh, seed=0):
    """A tiny train state on ``mesh``: float32 and bfloat16 params, an int32 scalar step, an optimizer moment."""
    rng = np.random.default_rng(seed)
    rows = NamedSharding(mesh, P("data", None))
    w = jax.device_put(rng.standard_normal((8, 16), dtype=np.float32), rows)
    emb = jax.device_put(jnp.asarray(rng.standard_normal((16, 8)), dtype=jnp.bfloat16), rows)
    mu = jax.device_put(rng.standard_normal((8, 16)).astype(np.float32), rows)
    step = jax.device_put(jnp.int32(seed + 7), NamedSharding(mesh, P()))
    return TinyState(step=step, params={"w": w, "emb": emb}, opt_state={"mu": mu})


def abstract_like(tree, shardings=None):
    """The restore target: ShapeDtypeStructs with the arrays' own shardings or those of ``shardings``."""
    shardings = jax.tree.map(lambda x: x.sharding, tree) if shardings is None else shardings
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def assert_bit_identical(restored, expected):
    """Same structure, dtypes and bytes (NaNs included) as the host copy ``expected``."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def step_dirs(path):
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(8, 1, 1)


def test_round_trip_is_bit_identical(tmp_path, mesh8):
    state = make_state(mesh8)
    data = {"version": 1, "step": 5, "seed": 3, "rows_drawn": {"en": 40, "de": 12}}
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=5), meta={"config_hash": "abc123"}) as ckpt:
        assert ckpt.save(5, state, data)
        ckpt.wait()
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=5)) as ckpt:  # a fresh process would do this
        step, restored, data_state = ckpt.restore(abstract_like(state))
        assert step == 5 and data_state == data
        assert isinstance(restored, TinyState)
        assert_bit_identical(restored, host_copy(state))
        assert restored.params["emb"].dtype == jnp.bfloat16 and restored.step.dtype == jnp.int32
        assert restored.params["w"].sharding == state.params["w"].sharding
        assert ckpt.read_meta() == {"config_hash": "abc123"}


def test_interval_and_keep_last_n(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=2, keep=2, async_save=False)) as ckpt:
        saved = [s for s in range(1, 10) if ckpt.save(s, state, {"step": s})]
        assert saved == [2, 4, 6, 8]  # the first step offered (1) is not saved: the interval rules
        assert ckpt.save(9, state, {"step": 9}, force=True)
        assert not ckpt.save(9, state, {"step": 9}, force=True)  # already there: nothing to do
        ckpt.wait()
        assert ckpt.latest_step() == 9 and ckpt.all_steps() == [8, 9]
    assert step_dirs(tmp_path) == [8, 9]


def test_async_save_survives_donated_buffers(tmp_path, mesh8):
    state = make_state(mesh8, seed=1)
    expected = host_copy(state)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=True)) as ckpt:
        assert ckpt.save(3, state, {"step": 3})
        abstract = abstract_like(state)
        for leaf in jax.tree.leaves(state):  # what a donating train step does to the old state
            leaf.delete()
        ckpt.wait()
        assert ckpt.latest_step() == 3
        _, restored, _ = ckpt.restore(abstract)
    assert_bit_identical(restored, expected)


def test_restore_onto_a_different_mesh(tmp_path, mesh8):
    state = make_state(mesh8, seed=2)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ckpt:
        ckpt.save(1, state, {"step": 1})
    mesh = make_mesh(1, 2, 4)
    axes = TinyState(step=(), params={"w": ("embed", "mlp"), "emb": ("vocab", "embed")},
                     opt_state={"mu": ("embed", "mlp")})
    shardings = tree_shardings(axes, state, mesh)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ckpt:
        _, restored, _ = ckpt.restore(abstract_like(state, shardings))
    assert_bit_identical(restored, host_copy(state))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert got.sharding == want
    assert restored.params["w"].sharding.spec == P("fsdp", "tensor")
    assert restored.params["w"].sharding.mesh.devices.shape == (1, 2, 4)


def _array_files(step_dir):
    """Tensorstore's data files of the state (the merged OCDBT and the per-process one)."""
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _delete_array_files(step_dir):
    for path in _array_files(step_dir):
        path.unlink()


def _truncate_array_files(step_dir):
    for path in _array_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


def _truncate_data_state(step_dir):
    (step_dir / "data" / "metadata").write_text('{"step": ')


def _remove_commit_metadata(step_dir):
    (step_dir / "_CHECKPOINT_METADATA").unlink()


# a failed read leaves orbax/tensorstore callbacks for a closed event loop and unawaited coroutines: noise
orbax_failed_read_noise = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning",
                                                     "ignore:coroutine .* was never awaited:RuntimeWarning")


@orbax_failed_read_noise
@pytest.mark.parametrize("corrupt", [_delete_array_files, _truncate_array_files,
                                     _truncate_data_state, _remove_commit_metadata])
def test_broken_latest_step_falls_back_to_the_previous(tmp_path, mesh8, caplog, corrupt):
    old, new = make_state(mesh8, seed=3), make_state(mesh8, seed=4)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=False)) as ckpt:
        ckpt.save(1, old, {"step": 1})
        ckpt.save(2, new, {"step": 2})
    corrupt(tmp_path / "2")
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ckpt:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, data_state = ckpt.restore_latest_valid(abstract_like(old))
        assert (step, data_state) == (1, {"step": 1})
        assert_bit_identical(restored, host_copy(old))
        lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
        assert any(f"step 2 ({tmp_path / '2'}) is corrupt or partial" in line and "Error" in line for line in lines)
        assert all("\n" not in line for line in lines)
        # the broken step is gone, so the resumed run can save step 2 again
        assert ckpt.all_steps() == [1] and step_dirs(tmp_path) == [1]
        assert ckpt.save(2, new, {"step": 2})
        ckpt.wait()
        assert ckpt.restore_latest_valid(abstract_like(new))[0] == 2


@orbax_failed_read_noise
def test_no_restorable_step_is_an_error_not_a_fresh_start(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=False)) as ckpt:
        ckpt.save(1, state, {"step": 1})
    _truncate_data_state(tmp_path / "1")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ClpError, match="none of the checkpoints"):
        ckpt.restore_latest_valid(abstract_like(state))
    assert step_dirs(tmp_path) == [1]  # nothing deleted


def numpy_checksum(tree):
    """The checksum's definition in numpy: per leaf, the wrapping uint32 sum of its elements' bits (each bitcast
    to an unsigned int of its width), folded FNV-1a style with the leaf index."""
    acc = 2166136261
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        bits = np.asarray(leaf).view(f"uint{8 * np.asarray(leaf).dtype.itemsize}")
        total = int(bits.astype(np.uint64).sum()) % 2**32
        acc = ((acc ^ ((total + i * 0x9E3779B1) % 2**32)) * 16777619) % 2**32
    return acc


def test_state_checksum_is_exact_sees_a_flipped_bit_and_swapped_leaves_but_not_the_sharding(mesh8):
    state = make_state(mesh8, seed=5)
    checksum = state_checksum(state)
    assert checksum == numpy_checksum(host_copy(state))
    mesh = make_mesh(1, 2, 4)
    other = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp", "tensor") if x.ndim else P())),
                         state)
    assert state_checksum(other) == checksum
    w = np.array(state.params["w"])
    w.view(np.uint32)[3, 5] ^= 1 << 20
    assert state_checksum(state.replace(params={**state.params, "w": w})) != checksum
    swapped = state.replace(params={**state.params, "w": state.opt_state["mu"]}, opt_state={"mu": state.params["w"]})
    assert state_checksum(swapped) != checksum


def big_state(mesh, seed):
    """A state whose float32 leaf (256 KB) Orbax stores outside the CRC-checked b-tree nodes of its OCDBT files."""
    rng = np.random.default_rng(seed)
    w = jax.device_put(rng.standard_normal((256, 256), dtype=np.float32), NamedSharding(mesh, P("data", None)))
    return {"w": w, "step": jax.device_put(jnp.int32(seed), NamedSharding(mesh, P()))}


def _flip_a_tensor_byte(step_dir):
    """Flip one bit in the middle of the largest array data file: inside the (compressed) tensor bytes."""
    path = max(_array_files(step_dir), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    assert len(data) > 100_000
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@orbax_failed_read_noise
def test_bit_flipped_latest_step_fails_its_checksum_and_falls_back(tmp_path, mesh8, caplog):
    old, new = big_state(mesh8, 1), big_state(mesh8, 2)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=False)) as ckpt:
        ckpt.save(1, old, {"step": 1})
        ckpt.save(2, new, {"step": 2})
    _flip_a_tensor_byte(tmp_path / "2")
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ckpt:
        with pytest.raises(ClpError, match="checksum mismatch"):
            ckpt.restore(abstract_like(new), 2)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, _ = ckpt.restore_latest_valid(abstract_like(old))
        assert step == 1 and ckpt.all_steps() == [1]
        assert_bit_identical(restored, host_copy(old))
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert any("step 2 " in line and "checksum mismatch" in line and "\n" not in line for line in lines), lines


def test_checkpoint_without_a_checksum_or_restored_as_other_dtypes_still_restores(tmp_path, mesh8):
    state = big_state(mesh8, 3)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=False)) as ckpt:
        ckpt.save(1, state, {"step": 1})
        ckpt.save(2, state, {"step": 2})
    shutil.rmtree(tmp_path / "1" / "checksum")  # as saved before checkpoints had one
    as_bf16 = {**abstract_like(state), "w": jax.ShapeDtypeStruct((256, 256), jnp.bfloat16,
                                                                 sharding=state["w"].sharding)}
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ckpt:
        assert_bit_identical(ckpt.restore(abstract_like(state), 1)[1], host_copy(state))
        restored = ckpt.restore(as_bf16, 2)[1]  # Orbax casts: the saved checksum does not apply
        assert restored["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]).astype(jnp.bfloat16))


KILLED_MID_SAVE = """
import os, signal, sys, time
import jax.numpy as jnp
from clp_jax.train.checkpoint import CheckpointConfig, Checkpointer
ckpt = Checkpointer(sys.argv[1], CheckpointConfig(every_steps=1, async_save=True))
ckpt.save(1, {"w": jnp.full((8, 16), 1.0)}, {"step": 1})
ckpt.wait()
ckpt.save(2, {"w": jnp.full((4096, 4096), 2.0)}, {"step": 2})  # 64 MB, still being written when killed
for _ in range(2000):  # the async save makes its temp dir in the background: kill once it exists
    if any(".orbax-checkpoint-tmp" in name for name in os.listdir(sys.argv[1])):
        break
    time.sleep(0.001)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_save_killed_midway_leaves_a_tmp_dir_that_is_ignored_and_cleaned(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and leftovers[0].startswith("2.")  # orbax 0.12.8 names it "2.orbax-checkpoint-tmp"
    target = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))}
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # the leftover was deleted on opening
        step, restored, data_state = ckpt.restore_latest_valid(target)
        assert (step, data_state) == (1, {"step": 1}) and float(restored["w"].sum()) == 128.0
        assert ckpt.save(2, restored, {"step": 2})  # the same step can be saved again
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


OPEN_AND_EXIT = """
import sys
from clp_jax.train.checkpoint import Checkpointer
Checkpointer(sys.argv[1]).close()
"""


def test_a_run_that_exits_before_saving_still_deletes_the_leftover_without_errors(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp").mkdir()  # a save killed midway, as the test above leaves it
    proc = subprocess.run([sys.executable, "-c", OPEN_AND_EXIT, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_sigterm_sets_the_preemption_flag(tmp_path):
    def guard(*_):  # if ours were not installed, the test must not die
        pass

    outer = signal.signal(signal.SIGTERM, guard)
    try:
        with Checkpointer(tmp_path, CheckpointConfig(every_steps=100)) as ckpt:
            flag = ckpt.install_preemption_handler()
            assert not flag.requested and not ckpt.should_save_for_preemption(5)
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.requested and ckpt.should_save_for_preemption(6)
        assert signal.getsignal(signal.SIGTERM) is guard  # close() put the previous handler back
    finally:
        signal.signal(signal.SIGTERM, outer)


def test_nothing_to_restore(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path / "fresh") as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.restore_latest_valid(abstract_like(state)) is None
        assert ckpt.read_meta() is None
        with pytest.raises(ClpError, match="no checkpoint to restore"):
            ckpt.restore(abstract_like(state))


def test_data_state_must_be_json(tmp_path, mesh8):
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1)) as ckpt:
        with pytest.raises(ClpError, match="data state saved at step 1 must be a JSON-serializable"):
            ckpt.save(1, make_state(mesh8), {"step": np.int64(1)})
        assert ckpt.all_steps() == []


def test_config_rejects_nonpositive_values():
    with pytest.raises(ValueError):
        CheckpointConfig(every_steps=0)
    with pytest.raises(ValueError):
        CheckpointConfig(keep=0)
