"""The run log: metrics as JSONL (one object per line, null for NaN/inf) and TensorBoard events (tensorboardX), MFU."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from clp_jax.chips import chip_for_device_kind
from clp_jax.files import atomic_open


def device_peak_flops() -> tuple[float | None, str]:
    """(vendor bf16 peak FLOP/s of all devices together, its source) from the chip table; None for a CPU or an
    unknown chip, which have no vendor peak (the source is then the device kind)."""
    kind = jax.devices()[0].device_kind
    chip = chip_for_device_kind(kind)
    if chip is None:
        return None, kind
    return chip.peak_flops * jax.device_count(), f"{kind} (vendor bf16 peak)"


def measure_matmul_flops(seconds: float = 1.0, n: int = 1024) -> float:
    """The float32 matmul rate this host reaches (FLOP/s), over all local devices as one process sees them."""
    a = jax.numpy.ones((n, n), jax.numpy.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


class MetricsWriter:
    """Append metrics to ``metrics.jsonl`` and TensorBoard events in ``run_dir`` (process 0 only)."""

    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = json_safe({k: _scalar(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps({"step": step, **clean}, sort_keys=True, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v).item()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts and lists too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def drop_metrics_after(run_dir: str, step: int) -> int:
    """Rewrite ``metrics.jsonl`` atomically without its records past ``step`` (and unreadable lines, e.g. one cut
    short by a kill), so a resumed run logs each step once; returns how many lines were dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
    if len(kept) < len(lines):
        with atomic_open(path) as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
