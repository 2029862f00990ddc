"""The fast tokenizer a GGUF file's metadata describes, built the way transformers' own GGUF loading builds it.

``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` reads the metadata with a torch-based reader; this does the
same steps from an already-read metadata dict (transformers' key table, its vocabulary builders, the tokenizer
class its ``AutoTokenizer`` picks for the model type), so no torch is needed.
"""

from __future__ import annotations

from typing import Any

from clp_jax.errors import ClpError

# tokenizer init argument -> the metadata key (under tokenizer.ggml.) holding its id
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def tokenizer_spec(meta: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vocabulary spec for transformers' builders, tokenizer init arguments) from the GGUF metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    spec, init = groups["tokenizer"], groups["tokenizer_config"]
    tokens = spec.get("tokens")
    if not tokens:
        raise ClpError(f"{path}: no tokenizer.ggml.tokens in the GGUF metadata")
    if spec.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a SentencePiece vocabulary unless told not to
        init.setdefault("add_bos_token", True)
    for role, key in _SPECIAL_IDS.items():
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None and not 0 <= index < len(tokens):
            raise ClpError(f"{path}: tokenizer.ggml.{key} is {index} but the vocabulary has {len(tokens)} tokens")
        init[role] = tokens[index] if index is not None else None
    return spec, init


def tokenizer_class(config: dict[str, Any]) -> type:
    """The class ``AutoTokenizer`` picks for a config without tokenizer files (TokenizersBackend by default)."""
    import transformers
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    cls = TOKENIZER_MAPPING.get(type(transformers.AutoConfig.for_model(**config)), None)
    if cls is None or cls.__name__ == "MistralCommonBackend":  # needs Mistral's own files, which a GGUF lacks
        return transformers.TokenizersBackend
    return cls


def gguf_tokenizer(meta: dict[str, Any], config: dict[str, Any], path: str) -> Any:
    """The fast tokenizer (ids, special tokens, chat template) that transformers builds from this GGUF file."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    spec, init = tokenizer_spec(meta, path)
    try:
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], spec)
    except (ValueError, KeyError, TypeError) as e:
        raise ClpError(f"{path}: cannot build the tokenizer ({str(e).splitlines()[0]})") from None
    return tokenizer_class(config)(tokenizer_object=backend, **init, **extra)
