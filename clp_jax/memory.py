"""How much memory one device of a mesh can give a batch: the accelerator's free bytes, or a share of the host's
available RAM when the devices are CPU devices (they all live in it)."""

from __future__ import annotations

import os

from jax.sharding import Mesh

GIB = 1024**3


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB, or in MiB below 1 GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


def host_available_bytes() -> int | None:
    """The host's available RAM (``MemAvailable`` in /proc/meminfo, else free physical pages); None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_budget(mesh: Mesh) -> tuple[int, str] | None:
    """Free bytes per device of ``mesh`` and where the number comes from; None when the platform does not say."""
    device = mesh.devices.flat[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.platform} device memory"
    if device.platform == "cpu":
        host = host_available_bytes()
        if host is not None:
            return host // mesh.devices.size, f"available host RAM / {mesh.devices.size} CPU devices"
    return None
