"""Command-line entry points: `clp-jax <command>`; side effects (files, printing) live here."""
