"""Vendor figures of accelerator chips: the one table that MFU (train metrics) and `clp-jax plan` read; and
whether this host has libtpu and a TPU (standard library only: the CLI asks before JAX starts)."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: JAX device_kind prefixes, dense bf16 peak FLOP/s, HBM per chip and its bandwidth
    (bytes/s), libtpu's chip config."""

    device_kinds: tuple[str, ...]
    peak_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    chip_config: str | None = None  # v4: one JAX device per chip (megacore), as on a v4 VM


# Cloud TPU docs and NVIDIA datasheets (dense bf16, no sparsity; HBM GB/s as published, 1e9 bytes).
CHIPS: dict[str, Chip] = {
    "v4": Chip(("TPU v4",), 275e12, 32 * GIB, 1200e9, "megacore"),
    "v5e": Chip(("TPU v5 lite", "TPU v5e"), 197e12, 16 * GIB, 819e9),
    "v5p": Chip(("TPU v5p", "TPU v5"), 459e12, 95 * GIB, 2765e9),  # v5p devices report "TPU v5"
    "v6e": Chip(("TPU v6 lite", "TPU v6e"), 918e12, 32 * GIB, 1640e9),
    "a100": Chip(("NVIDIA A100",), 312e12, 80 * GIB, 2039e9),
    "h100": Chip(("NVIDIA H100",), 989e12, 80 * GIB, 3350e9),
    "h200": Chip(("NVIDIA H200",), 989e12, 141 * GIB, 4800e9),
}
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")


def chip_for_device_kind(kind: str) -> Chip | None:
    """The chip whose longest device_kind prefix starts ``kind`` (so "TPU v5 lite" is v5e, not v5p)."""
    matches = [(len(p), c) for c in CHIPS.values() for p in c.device_kinds if kind.startswith(p)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def libtpu_installed() -> bool:
    """Whether libtpu (the TPU compiler) can be loaded: the ``libtpu`` package or ``TPU_LIBRARY_PATH``."""
    return importlib.util.find_spec("libtpu") is not None or os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", ""))


def host_has_tpu(sysfs: str = "/sys/bus/pci/devices", dev: str = "/dev") -> bool:
    """Whether a TPU is attached: a Google (PCI vendor 0x1ae0) device on the PCI bus, or /dev/accel* nodes."""
    for vendor in glob.glob(os.path.join(sysfs, "*", "vendor")):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip().lower() == "0x1ae0":
                    return True
        except OSError:
            continue
    return bool(glob.glob(os.path.join(dev, "accel*")))
