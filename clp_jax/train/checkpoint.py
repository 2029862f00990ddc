"""Checkpoints of a run: the train state, the data iterator's position and run metadata, through Orbax.

The only module that touches Orbax. Each saved step is a directory ``<dir>/<step>/{state,data,checksum,meta}``;
Orbax writes it as ``<step>.orbax-checkpoint-tmp`` and renames it on commit (writing
``_CHECKPOINT_METADATA`` with a commit time and ``commit_success.txt``), so a process killed mid-save
leaves only a tmp directory, which is never listed as a step and is deleted when the next run opens the
directory. Restoring takes abstract arrays carrying the *target* shardings, so a run may resume on a
different mesh. A step that fails to restore, or whose state no longer matches the integer checksum saved
with it (``state_checksum``), is reported and skipped in favour of the one before it.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from pydantic import PositiveInt

from clp_jax.config import ConfigModel
from clp_jax.errors import ClpError

log = logging.getLogger(__name__)

STATE, DATA, META, CHECKSUM = "state", "data", "meta", "checksum"
COMMIT_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")


class CheckpointConfig(ConfigModel):
    """When to save (every N steps), how many step directories to keep, and whether writes run in the background."""

    every_steps: PositiveInt = 1000
    keep: PositiveInt = 3
    async_save: bool = True


class PreemptionFlag:
    """Set by SIGTERM (a scheduler's preemption notice); the loop polls ``requested``."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.requested = False
        self.signum = signum
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            log.warning("received %s: will save a checkpoint and stop", signal.Signals(signum).name)
        self.requested = True

    def close(self) -> None:
        """Put back the handler that was there before (if ours is still the one installed)."""
        if self._installed and signal.getsignal(self.signum) == self._handle:
            signal.signal(self.signum, self._previous)
        self._installed = False

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def install_preemption_handler(signum: int = signal.SIGTERM) -> PreemptionFlag:
    """A flag set by ``signum``; with several JAX processes, JAX's preemption service owns SIGTERM instead."""
    flag = PreemptionFlag(signum)
    if jax.process_count() > 1:
        # A Python handler would replace the one JAX's preemption service installed, and a flag set on one
        # host only would deadlock a collective save; `reached_preemption` syncs the decision across hosts.
        log.info("multi-host run: leaving %s to JAX's preemption service", signal.Signals(signum).name)
        return flag
    if threading.current_thread() is not threading.main_thread():
        raise ClpError("install_preemption_handler: signal handlers can only be installed from the main thread")
    previous = signal.signal(signum, flag._handle)
    flag._previous = signal.SIG_DFL if previous is None else previous
    flag._installed = True
    return flag


def _leaf_sum(x: jax.Array) -> jax.Array:
    """The wrapping uint32 sum of a leaf's bits: each element bitcast to an unsigned int of its width."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize == 8:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    return jnp.sum(words, dtype=jnp.uint32)


def _combine(sums: list[jax.Array]) -> jax.Array:
    """One uint32 from per-leaf sums, FNV-1a style with the leaf index mixed in (so swapped leaves differ)."""
    acc = jnp.uint32(2166136261)
    for i, s in enumerate(sums):
        acc = (acc ^ (s + jnp.uint32((i * 0x9E3779B1) & 0xFFFFFFFF))) * jnp.uint32(16777619)
    return acc


@jax.jit
def _state_checksum(tree: Any) -> jax.Array:
    return _combine([_leaf_sum(x) for x in jax.tree.leaves(tree)])


def state_checksum(tree: Any) -> int:
    """An exact uint32 checksum of every array leaf's bits, computed on device; independent of the sharding."""
    out = _state_checksum(tree)
    return int(np.asarray(out.addressable_shards[0].data))


def _dtypes(tree: Any) -> list[str]:
    return [str(np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _json_dict(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A JSON round-tripped copy of ``value`` (so a restore returns exactly it), or a ClpError naming ``what``."""
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as e:
        raise ClpError(f"{what} must be a JSON-serializable mapping ({e})") from None


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _delete_unfinished_saves(directory: epath.Path) -> None:
    """Delete the tmp directories of saves killed midway, on the primary process, before returning.

    Orbax's own ``cleanup_tmp_directories`` runs in a background thread that it awaits only in ``save``:
    a run that restores or exits before saving would still list the leftovers, and its thread would log
    an error at interpreter shutdown.
    """
    if jax.process_index() != 0:
        return
    for name in ocp.path.step.tmp_checkpoints(directory):
        log.info("deleting %s: a save that did not finish", directory / name)
        (directory / name).rmtree()


class Checkpointer:
    """Saves and restores (train state, data iterator state, run metadata) in one directory, one folder per step."""

    def __init__(self, directory: str | epath.PathLike, config: CheckpointConfig | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        path = epath.Path(directory)
        self.directory = path if "://" in str(directory) else epath.Path(path.expanduser().absolute())
        self.config = config or CheckpointConfig()
        self.meta = _json_dict(meta, "checkpoint meta") if meta is not None else None
        self._preemption: PreemptionFlag | None = None
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.keep,
            save_interval_steps=self.config.every_steps,
            # the interval and preemption only: Orbax's default also saves the first step it is offered
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(self.config.every_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            enable_async_checkpointing=self.config.async_save,
            cleanup_tmp_directories=False,  # done by _delete_unfinished_saves, before the manager lists steps
            create=True,
        )
        try:
            _delete_unfinished_saves(self.directory)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise ClpError(f"{self.directory}: cannot open the checkpoint directory ({_one_line(e)})") from None

    def save(self, step: int, state: Any, data_state: Mapping[str, Any], force: bool = False) -> bool:
        """Start saving at ``step`` if it is on the interval (or ``force``); True if a save started."""
        step = int(step)
        if step in self._manager.all_steps():  # e.g. a preemption save right after the periodic one
            return False
        data = _json_dict(data_state, f"the data state saved at step {step}")
        if not force and not self._manager.should_save(step):
            return False
        checksum = {"state": state_checksum(state), "dtypes": _dtypes(state)}
        items = {STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data),
                 CHECKSUM: ocp.args.JsonSave(checksum)}
        if self.meta is not None:
            items[META] = ocp.args.JsonSave(self.meta)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def wait(self) -> None:
        """Block until every save in flight is committed."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest saved step (a save still in flight counts), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _check_committed(self, step: int) -> None:
        path = self._step_dir(step)
        missing = [name for name in COMMIT_MARKERS if not (path / name).exists()]
        if missing:
            raise ClpError(f"{path}: checkpoint was not committed (missing {', '.join(missing)})")
        try:
            committed = json.loads((path / COMMIT_MARKERS[0]).read_text()).get("commit_timestamp_nsecs")
        except (OSError, ValueError, AttributeError) as e:
            raise ClpError(f"{path / COMMIT_MARKERS[0]}: unreadable ({_one_line(e)})") from None
        if not committed:
            raise ClpError(f"{path / COMMIT_MARKERS[0]}: has no commit time; the save did not finish")

    def restore(self, target_state_abstract: Any, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
        """(step, state, data_state) of ``step`` (default: latest), placed with the abstract target's shardings."""
        self.wait()
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise ClpError(f"{self.directory}: no checkpoint to restore")
        if step not in self._manager.all_steps():
            raise ClpError(f"{self.directory}: no checkpoint at step {step} (saved steps: {self.all_steps()})")
        self._check_committed(step)
        items = {STATE: ocp.args.StandardRestore(target_state_abstract), DATA: ocp.args.JsonRestore()}
        has_checksum = (self._step_dir(step) / CHECKSUM).exists()  # checkpoints from before checksums have none
        if has_checksum:
            items[CHECKSUM] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if has_checksum:
            self._verify(step, restored[STATE], dict(restored[CHECKSUM]))
        return step, restored[STATE], dict(restored[DATA])

    def _verify(self, step: int, state: Any, saved: dict[str, Any]) -> None:
        """A ClpError unless ``state`` has the checksum saved with ``step``; skipped if restored as other dtypes."""
        if saved.get("dtypes") != _dtypes(state):
            log.info("checkpoint step %d restored with other dtypes than saved: checksum not checked", step)
            return
        got = state_checksum(state)
        if got != saved.get("state"):
            raise ClpError(f"{self._step_dir(step)}: checksum mismatch (saved {saved.get('state')}, restored "
                           f"{got}): the checkpoint's bytes changed after it was written")

    def restore_latest_valid(self, target_state_abstract: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """Restore the newest step that restores cleanly, warning about (and deleting) newer broken ones.

        None when the directory holds no checkpoint; a ClpError when it holds some but none restores.
        """
        self.wait()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        broken: list[int] = []
        for step in steps:
            try:
                result = self.restore(target_state_abstract, step)
            except Exception as e:  # any failure to read a step means: try the one before it
                log.warning("checkpoint step %d (%s) is corrupt or partial, falling back to an earlier step: %s",
                            step, self._step_dir(step), _one_line(e))
                broken.append(step)
                continue
            for bad in broken:  # so the resumed run can save these steps again
                log.warning("deleting broken checkpoint step %d (%s); resuming from step %d",
                            bad, self._step_dir(bad), step)
                self._manager.delete(bad)
            return result
        if broken:
            raise ClpError(f"{self.directory}: none of the checkpoints at steps {sorted(broken)} could be restored "
                           "(see the warnings above); move the directory away to start from scratch")
        return None

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        """The run metadata saved with ``step`` (default: latest), or None if there is none."""
        self.wait()
        step = self.latest_step() if step is None else int(step)
        if step is None or not (self._step_dir(step) / META).exists():
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(restored[META])

    def install_preemption_handler(self) -> PreemptionFlag:
        """Install (once) the SIGTERM flag that ``should_save_for_preemption`` reads; undone by ``close``."""
        if self._preemption is None:
            self._preemption = install_preemption_handler()
        return self._preemption

    def should_save_for_preemption(self, step: int) -> bool:
        """True once SIGTERM arrived or every host reached JAX's preemption sync point (call it every step)."""
        reached = bool(self._manager.reached_preemption(int(step)))
        return reached or (self._preemption is not None and self._preemption.requested)

    def close(self) -> None:
        """Finish pending saves, release Orbax's resources and the signal handler."""
        self._manager.close()
        if self._preemption is not None:
            self._preemption.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
