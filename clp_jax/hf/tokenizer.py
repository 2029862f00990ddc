"""Loading Hugging Face tokenizers from local dirs, with clear errors."""

from __future__ import annotations

import os
from typing import Any

from clp_jax.errors import ClpError


def load_tokenizer(path: str) -> Any:
    """``AutoTokenizer`` from a local dir (never the hub)."""
    import transformers

    if not os.path.isdir(path):
        raise ClpError(f"{path}: tokenizer directory not found")
    if not any(os.path.isfile(os.path.join(path, f)) for f in
               ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        raise ClpError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json or "
                       "tokenizer.model)")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ClpError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, where: str) -> None:
    """A tokenizer may be smaller than the embedding matrix (padding rows), never larger."""
    if len(tokenizer) > vocab_size:
        raise ClpError(f"{where}: tokenizer has {len(tokenizer)} tokens but the embedding matrix has only "
                       f"{vocab_size} rows")
