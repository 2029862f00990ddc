"""The transfer pipeline: a source model dir + a small target-language helper -> a same-size target-language dir.

Only the embedding matrices are computed (on the mesh); every other tensor streams from the source
checkpoint to the output one at a time, so the whole model is never held on the host.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Literal

import jax
import numpy as np
import pydantic

from clp_jax import models
from clp_jax.config import ConfigModel, config_to_dict
from clp_jax.errors import ClpError
from clp_jax.files import check_writable
from clp_jax.hf.reader import TensorFiles, hf_key, load_params, read_config, read_config_dict, read_generation_config
from clp_jax.hf.tokenizer import check_tokenizer_fits, load_tokenizer
from clp_jax.hf.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    hf_config_dict,
    save_pretrained,
    write_model_dir,
)
from clp_jax.models.config import NP_DTYPES, TransformerConfig
from clp_jax.models.weights import lookup
from clp_jax.sharding import MeshConfig, mesh_from_config
from clp_jax.transfer.align import VocabAlignment, align_vocabularies, fvt_pieces
from clp_jax.transfer.embeddings import HELPER_STRATEGIES, MAX_NORM_FACTOR, MIN_MEAN_COS, RULE
from clp_jax.transfer.params import STRATEGIES, embedding_paths, from_scratch_params, transfer_params
from clp_jax.transfer.validate import DEFAULT_STRATEGY

Strategy = Literal["clp", "clp-topk", "clp-sparsemax", "omp", "fvt", "random", "mean", "overlap", "from-scratch"]
assert set(Strategy.__args__) == set(STRATEGIES)


class TransferConfig(ConfigModel):
    """One transfer: what `clp-jax transfer` reads (its flags set the same keys) and `run_transfer` runs."""

    source: str
    helper: str | None = None
    out: str
    helper_tokenizer: str | None = None
    strategy: Strategy = DEFAULT_STRATEGY
    matching: Literal["auto", "exact", "canonical"] = "auto"
    seed: int = 0
    block_size: int = pydantic.Field(1024, ge=1)
    top_k: int = pydantic.Field(10, ge=1)
    temperature: float = pydantic.Field(0.1, gt=0)
    omp_k: int = pydantic.Field(64, ge=1)
    center_helper: bool = False
    match_norms: bool = False
    min_mean_cos: float = pydantic.Field(MIN_MEAN_COS, ge=0)
    max_norm_factor: float = pydantic.Field(MAX_NORM_FACTOR, gt=0)
    max_shard_bytes: int = pydantic.Field(DEFAULT_MAX_SHARD_BYTES, ge=1)
    overwrite: bool = False
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1)


def _say(msg: str) -> None:
    print(f"[transfer] {msg}", file=sys.stderr, flush=True)


def input_embedding(model_dir: str) -> np.ndarray:
    """A model dir's input embedding matrix (host, float32), read as one tensor."""
    cfg = read_config(model_dir)
    family = models.family(cfg.arch)
    spec = next(s for s in family.weight_specs(cfg) if s.paths == (("embed", "embedding"),))
    files = TensorFiles(model_dir)
    key = hf_key(files, spec, family.BASE_PREFIX)
    if key is None:
        raise ClpError(f"{model_dir}: checkpoint has no input embedding {family.BASE_PREFIX + spec.hf_name!r}")
    return np.asarray(files.get(key), dtype=np.float32)


def helper_embedding(helper_dir: str, helper_vocab_needed: int) -> np.ndarray:
    """The helper's input embedding matrix (host, float32), checked to cover its tokenizer."""
    emb = input_embedding(helper_dir)
    if helper_vocab_needed > emb.shape[0]:
        raise ClpError(f"{helper_dir}: helper tokenizer has {helper_vocab_needed} tokens but the helper embedding "
                       f"has only {emb.shape[0]} rows")
    return emb


def streamed_tensors(source_dir: str, cfg: TransformerConfig, target: TransformerConfig, params: dict,
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """Source tensors in file order, the vocabulary-sized ones replaced by the target's."""
    files = TensorFiles(source_dir)
    family = models.family(cfg.arch)
    replaced = {}
    for spec in family.weight_specs(target):
        if set(spec.paths) & set(embedding_paths(target)):
            replaced[hf_key(files, spec, family.BASE_PREFIX)] = spec
    for key in files.files:
        if key in replaced:
            spec = replaced[key]
            parts = [np.asarray(jax.device_get(lookup(params, p))) for p in spec.paths]
            yield key, np.ascontiguousarray(spec.to_hf(*parts))
        elif cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # tied: transformers rebuilds it from the input embedding
        else:
            yield key, files.get(key)


def _report(cfg: TransferConfig, alignment: VocabAlignment, stats, timings: dict, target: TransformerConfig,
            source_cfg: TransformerConfig) -> dict:
    report = {
        "strategy": cfg.strategy, "source": os.path.abspath(cfg.source),
        "helper": os.path.abspath(cfg.helper) if cfg.helper else None,
        "target_tokenizer": os.path.abspath(cfg.helper_tokenizer or cfg.helper),
        "shared_tokens": len(alignment.target_ids),
        "source_vocab_size": source_cfg.vocab_size, "target_vocab_size": target.vocab_size,
        "tied_embeddings": target.tie_word_embeddings, "dtype": target.param_dtype,
        "alignment": alignment.to_report(), "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "config": config_to_dict(cfg),
    }
    if stats is None:
        report.update(overlap=0, missing=target.vocab_size, degenerate_rows=0, options={"seed": cfg.seed})
        return report
    matrices = ["/".join(path) for path in embedding_paths(target)]
    report.update(
        overlap=stats.n_overlap, missing=stats.n_missing, degenerate_rows=stats.n_degenerate,
        degenerate_target_ids=[int(i) for i in stats.degenerate_target_ids[:1000]],
        options={k: str(v) if isinstance(v, float) and not math.isfinite(v) else v  # strict JSON: "inf"
                 for k, v in {**stats.params, **stats.checks}.items()},
        ill_conditioned={
            "rule": RULE, "handling": stats.checks["fallback"], "counts": stats.reasons,
            "target_ids": {k: [int(i) for i in ids[:1000]] for k, ids in stats.reason_target_ids.items()},
        },
        row_norms={"matrices": matrices, "source": list(stats.source_row_norms),
                   "computed": list(stats.computed_row_norms)},
    )
    return report


def run_transfer(cfg: TransferConfig) -> dict:
    """Run one transfer as configured and write ``cfg.out``; returns the summary `clp-jax transfer` prints."""
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise ClpError(f"{cfg.out}: output directory exists (pass --overwrite to replace it)")
    if cfg.strategy in HELPER_STRATEGIES and cfg.helper is None:
        raise ClpError(f"strategy {cfg.strategy!r} needs --helper (a target-language model whose input embeddings "
                       "it uses); fvt, mean, random, overlap and from-scratch need only --helper-tokenizer")
    if cfg.helper_tokenizer is None and cfg.helper is None:
        raise ClpError("no target tokenizer: pass --helper-tokenizer DIR (or --helper DIR with a tokenizer)")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source_cfg = read_config(cfg.source)
    source_tok = load_tokenizer(cfg.source)
    target_tok = load_tokenizer(cfg.helper_tokenizer or cfg.helper)
    check_tokenizer_fits(source_tok, source_cfg.vocab_size, cfg.source)
    emb = helper_embedding(cfg.helper, len(target_tok)) if cfg.helper else None
    target_vocab = emb.shape[0] if emb is not None else len(target_tok)
    check_writable(cfg.out, _output_bytes(source_cfg, target_vocab))
    target_tok.model_max_length = source_cfg.max_position_embeddings  # the target has the source's positions
    alignment = align_vocabularies(source_tok, target_tok, cfg.matching)
    pieces = None
    if cfg.strategy == "fvt":
        pieces = fvt_pieces(source_tok, target_tok, target_vocab, skip=alignment.target_ids)
    timings["align"] = time.perf_counter() - t0
    _say(f"{alignment.mode} matching ({alignment.source_style} -> {alignment.target_style}): "
         f"{len(alignment.target_ids)} of {len(target_tok)} target tokens shared with the source")
    mesh = mesh_from_config(cfg.mesh)
    base = read_config_dict(cfg.source)
    generation = _generation_config(cfg.source)
    stats = None
    if cfg.strategy == "from-scratch":
        t = time.perf_counter()
        params, target = from_scratch_params(source_cfg, target_vocab, mesh, cfg.seed)
        timings["init"] = time.perf_counter() - t
        t = time.perf_counter()
        save_pretrained(cfg.out, params, target, base_config=base, tokenizer=target_tok, generation_config=generation,
                        extra_json={"transfer_report.json": _report(cfg, alignment, None, timings, target, source_cfg)},
                        max_shard_bytes=cfg.max_shard_bytes, overwrite=cfg.overwrite)
        timings["write"] = time.perf_counter() - t
    else:
        t = time.perf_counter()
        _, emb_params = load_params(cfg.source, mesh, source_cfg, only=embedding_paths(source_cfg))
        timings["load_embeddings"] = time.perf_counter() - t
        t = time.perf_counter()
        _say(f"computing {cfg.strategy} embeddings for {target_vocab} target rows on a {dict(mesh.shape)} mesh")
        params, target, stats = transfer_params(
            emb_params, source_cfg, emb, alignment, target_vocab, strategy=cfg.strategy, mesh=mesh, seed=cfg.seed,
            block_size=cfg.block_size, top_k=cfg.top_k, temperature=cfg.temperature, pieces=pieces,
            center_helper=cfg.center_helper, omp_k=cfg.omp_k, match_norms=cfg.match_norms,
            min_mean_cos=cfg.min_mean_cos, max_norm_factor=cfg.max_norm_factor)
        jax.block_until_ready(params)
        timings["compute"] = time.perf_counter() - t
        if stats.n_degenerate:
            counts = ", ".join(f"{k}: {v}" for k, v in stats.reasons.items() if v)
            _say(f"{stats.n_degenerate} ill-conditioned rows ({counts}) got the fallback ({stats.checks['fallback']})")
        t = time.perf_counter()
        config = hf_config_dict(target, base, target_tok)
        n_tensors = len(TensorFiles(cfg.source).files)
        report = _report(cfg, alignment, stats, timings, target, source_cfg)
        write_model_dir(cfg.out, streamed_tensors(cfg.source, source_cfg, target, params), n_tensors, config,
                        tokenizer=target_tok, generation_config=generation,
                        extra_json={"transfer_report.json": report}, max_shard_bytes=cfg.max_shard_bytes,
                        overwrite=cfg.overwrite)
        timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    _say(f"wrote {cfg.out}")
    return {"out": cfg.out, "strategy": cfg.strategy, "overlap": stats.n_overlap if stats else 0,
            "shared_tokens": len(alignment.target_ids), "target_vocab_size": target_vocab,
            "degenerate_rows": stats.n_degenerate if stats else 0, "seconds": round(timings["total"], 3)}


def _output_bytes(source_cfg: TransformerConfig, target_vocab: int) -> int:
    """The target checkpoint's size: the source's parameters with the target's vocabulary, in the source dtype."""
    itemsize = np.dtype(NP_DTYPES[source_cfg.param_dtype]).itemsize
    return source_cfg.replace(vocab_size=target_vocab).num_params() * itemsize


def _generation_config(model_dir: str) -> dict:
    """The source's generation_config.json without token ids (the target tokenizer sets its own)."""
    return {k: v for k, v in read_generation_config(model_dir).items()
            if not k.endswith("_token_id") and k != "transformers_version"}
