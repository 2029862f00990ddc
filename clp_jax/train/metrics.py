"""Run metrics: JSONL (one object per line), TensorBoard event files (tensorboardX, no tensorflow), MFU."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from clp_jax.chips import chip_for_device_kind


def device_peak_flops(measure_seconds: float = 1.0) -> tuple[float, str]:
    """Peak FLOP/s of all devices together: a vendor figure for known accelerators, else a measured matmul rate."""
    kind = jax.devices()[0].device_kind
    chip = chip_for_device_kind(kind)
    if chip is not None:
        return chip.peak_flops * jax.device_count(), f"{kind} (vendor bf16 peak)"
    return measure_matmul_flops(measure_seconds), f"{kind} (measured float32 matmul)"


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
        clean = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
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


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
