"""Write parameters back as a Hugging Face model dir that transformers loads.

Safetensors (streamed tensor by tensor, sharded above ``max_shard_bytes``, with an index), config.json,
generation_config.json and tokenizer files go into a temporary dir next to the target, renamed into place at
the end: a failure leaves nothing half-written. Parameters are gathered to the host one tensor at a time, and
only one is held there at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from clp_jax import models
from clp_jax.files import atomic_dir, write_json
from clp_jax.hf.safetensors_stream import write_shards
from clp_jax.models.config import NP_DTYPES, TransformerConfig
from clp_jax.models.weights import lookup
from clp_jax.progress import bar

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def hf_config_dict(cfg: TransformerConfig, base: dict[str, Any] | None = None,
                   tokenizer: Any | None = None) -> dict[str, Any]:
    """config.json content: ``base`` (the source's) with our vocab/tying, or a fresh one from ``cfg``."""
    import transformers

    family = models.family(cfg.arch)
    ids = {f"{r}_token_id": getattr(tokenizer, f"{r}_token_id") if tokenizer is not None else None
           for r in ("bos", "eos", "pad")}
    if base is None:
        data = transformers.AutoConfig.for_model(**family.to_hf(cfg), **ids).to_dict()
    else:
        data = dict(base)
        data.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings)
        if tokenizer is not None:
            data.update(ids)
    data.pop("torch_dtype", None)
    data["dtype"] = cfg.param_dtype
    check = family.from_hf(transformers.AutoConfig.for_model(**data))
    if check.architecture() != cfg.architecture():
        raise ValueError(f"config.json would not describe this model: {check} != {cfg}")
    return data


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(params: dict, cfg: TransformerConfig) -> Iterable[tuple[str, np.ndarray]]:
    """(HF name, host array) for every checkpoint tensor, produced one at a time."""
    family = models.family(cfg.arch)
    np_dtype = NP_DTYPES[cfg.param_dtype]
    for spec in family.weight_specs(cfg):
        parts = [_to_host(lookup(params, p)) for p in spec.paths]
        name = spec.hf_name if spec.top_level else family.BASE_PREFIX + spec.hf_name
        yield name, np.ascontiguousarray(spec.to_hf(*parts), dtype=np_dtype)


def _write_safetensors(tmp: str, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int,
                       total: int) -> None:
    """Safetensors in ``tmp``, streamed one tensor at a time (sharded above ``max_shard_bytes``, with an index)."""
    stream = bar(tensors, total=total, desc="write safetensors", unit="tensor", leave=False)
    shards, where, grand_total = write_shards(tmp, stream, total, max_shard_bytes)
    if len(shards) == 1:
        os.rename(shards[0], os.path.join(tmp, "model.safetensors"))
        return
    finals = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for path, final in zip(shards, finals):
        os.rename(path, os.path.join(tmp, final))
    write_json(os.path.join(tmp, "model.safetensors.index.json"),
                {"metadata": {"total_size": grand_total},
                 "weight_map": {name: finals[int(i)] for name, i in where.items()}}, sort_keys=True)


def write_model_dir(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]], n_tensors: int, config: dict, *,
                    tokenizer: Any | None = None, generation_config: dict | None = None,
                    extra_json: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    overwrite: bool = False) -> None:
    """Write an HF model dir from (name, array) pairs, config.json, generation config, tokenizer, extra JSON."""
    if jax.process_index() != 0:  # every process takes part in the gathers; process 0 writes
        for _ in tensors:
            pass
        return

    def fill(tmp: str) -> None:
        _write_safetensors(tmp, tensors, max_shard_bytes, n_tensors)
        write_json(os.path.join(tmp, "config.json"), config, sort_keys=True)
        gen = dict(generation_config or {})
        gen.setdefault("_from_model_config", True)
        for role in ("bos", "eos", "pad"):
            if config.get(f"{role}_token_id") is not None:
                gen[f"{role}_token_id"] = config[f"{role}_token_id"]
        write_json(os.path.join(tmp, "generation_config.json"), gen, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_json or {}).items():
            write_json(os.path.join(tmp, name), data, sort_keys=True)

    atomic_dir(out_dir, fill, overwrite)


def save_pretrained(out_dir: str, params: dict, cfg: TransformerConfig, *, base_config: dict | None = None,
                    tokenizer: Any | None = None, generation_config: dict | None = None,
                    extra_json: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    overwrite: bool = False) -> None:
    """Write our parameters as an HF model dir that transformers loads."""
    config = hf_config_dict(cfg, base_config, tokenizer)
    n_tensors = len(models.family(cfg.arch).weight_specs(cfg))
    write_model_dir(out_dir, hf_tensors(params, cfg), n_tensors, config, tokenizer=tokenizer,
                    generation_config=generation_config, extra_json=extra_json, max_shard_bytes=max_shard_bytes,
                    overwrite=overwrite)
