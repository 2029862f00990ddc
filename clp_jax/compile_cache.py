"""XLA's persistent compilation cache: a rerun, or the next run of a grid whose cells share shapes, loads its
compiled programs from disk instead of compiling them again (minutes for a 30-layer model on a CPU)."""

from __future__ import annotations

import jax


def use_compilation_cache(path: str) -> None:
    """Cache compiled programs that took at least a second in ``path``, unless a cache dir is set already."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
