"""How much memory one device of a mesh can give a batch: the accelerator's free bytes, or a share of the host's
available RAM when the devices are CPU devices (they all live in it)."""

from __future__ import annotations

import os
from typing import Any

from jax.sharding import Mesh

from clp_jax.errors import ClpError

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


def compiled_extra_bytes(compiled: Any) -> int | None:
    """Bytes one device needs to run ``compiled`` beyond its (already resident) inputs: XLA's temporaries plus the
    outputs not aliased to donated inputs; None when XLA gives no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0))


def check_compiled_fits(compiled: Any, mesh: Mesh, what: str, advice: str) -> None:
    """A ClpError before the first run of ``compiled`` when XLA's memory analysis exceeds a device's free memory."""
    budget, need = device_budget(mesh), compiled_extra_bytes(compiled)
    if budget is None or need is None or need <= budget[0]:
        return
    raise ClpError(f"{what} needs about {format_bytes(need)} per device beyond its inputs (XLA's memory analysis "
                   f"of the compiled step) but only {format_bytes(budget[0])} are free ({budget[1]}); {advice}")
