"""Host malloc settings for training on a CPU.

XLA:CPU allocates a step's temporaries afresh on every execution, and glibc's malloc gives blocks over 32 MB (and
its per-thread heaps' free tops) back to the kernel when they are freed, so each step page-faults the same
memory in again: on the bench's GPT-2 (scripts/bench_train.py) 182k faults, about 700 MB, and a fifth of the
two cores' time in the kernel. One arena that never maps big blocks separately and never trims keeps freed
memory for the next step instead; the process's RSS then stays at its peak. The heap still grows by a
temporary's size a few times first, when other allocations split the hole a freed temporary left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

# mallopt's parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (one arena, no mmap'd blocks, no trimming).

    A thread keeps the arena it first allocated from, so this only helps before JAX starts its CPU client:
    after that it changes nothing and returns False, as it does where the C library is not glibc.
    """
    if not is_glibc() or _jax_backend_started():
        return False
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 is SIZE_MAX to glibc: the top of the heap is never handed back.
    settings = [(_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 64 << 20)]
    return all(mallopt(param, value) == 1 for param, value in settings)


def is_glibc() -> bool:
    """Whether this process's C library is glibc, whose mallopt keep_freed_memory calls."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _jax_backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
