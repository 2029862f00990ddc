"""Write the demo corpus to text files (one utterance per line), so configs can point at real paths."""

from __future__ import annotations

import os
from collections.abc import Sequence

from clp_jax.data.demo_corpus import demo_texts
from clp_jax.files import atomic_open


def write_demo_corpus(directory: str, languages: Sequence[str]) -> dict[str, str]:
    """``{lang: path}`` of ``<directory>/<lang>.txt`` for each language (rewritten each time)."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for lang in languages:
        path = os.path.join(directory, f"{lang}.txt")
        with atomic_open(path) as f:
            f.write("\n".join(demo_texts(lang)) + "\n")
        paths[lang] = path
    return paths
