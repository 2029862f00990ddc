"""`clp-jax transfer`: a source model + a small target-language helper -> a same-size target-language model.

Only the embedding matrices are computed (on the mesh); every other tensor streams from the source
checkpoint to the output one at a time, so the whole model is never held on the host.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from typing import Literal

import jax
import numpy as np
import pydantic

from clp_jax import models
from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.config import ConfigModel, config_to_dict
from clp_jax.errors import ClpError
from clp_jax.hf.reader import TensorFiles, hf_key, load_params, read_config, read_config_dict
from clp_jax.hf.tokenizer import check_tokenizer_fits, load_tokenizer
from clp_jax.hf.writer import DEFAULT_MAX_SHARD_BYTES, hf_config_dict, save_pretrained, write_model_dir
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import MeshConfig, mesh_from_config
from clp_jax.transfer.align import VocabAlignment, align_vocabularies
from clp_jax.transfer.pipeline import STRATEGIES, embedding_paths, from_scratch_params, transfer_params

Strategy = Literal["clp", "clp-topk", "clp-sparsemax", "random", "mean", "overlap", "from-scratch"]
assert set(Strategy.__args__) == set(STRATEGIES)


class TransferConfig(ConfigModel):
    """What `clp-jax transfer` reads; flags set the same keys."""

    source: str
    helper: str
    out: str
    helper_tokenizer: str | None = None
    strategy: Strategy = "clp"
    matching: Literal["auto", "exact", "canonical"] = "auto"
    seed: int = 0
    block_size: int = pydantic.Field(1024, ge=1)
    top_k: int = pydantic.Field(10, ge=1)
    temperature: float = pydantic.Field(0.1, gt=0)
    max_shard_bytes: int = pydantic.Field(DEFAULT_MAX_SHARD_BYTES, ge=1)
    overwrite: bool = False
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1)


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "transfer", parents=parents, help="CLP-Transfer: build a target-language model from a source + helper",
        description="CLP-Transfer (Ostendorff & Rehm 2023). The target model is the source model with its "
                    "embeddings replaced for the helper's tokenizer: shared tokens copy the source row, other "
                    "tokens are a cosine-weighted average (in the helper's embedding space) of the shared tokens' "
                    "source rows. Writes a Hugging Face dir with the helper's tokenizer and transfer_report.json. "
                    f"Strategies: {', '.join(STRATEGIES)}.")
    p.add_argument("--source", help="large source-language HF model dir (with tokenizer)")
    p.add_argument("--helper", help="small target-language HF model dir (its input embeddings are used)")
    p.add_argument("--out", help="output HF model dir (refused if it exists, unless --overwrite)")
    p.add_argument("--helper-tokenizer", help="target tokenizer dir if not in --helper")
    p.add_argument("--strategy", help="embedding initialization (default clp)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out dir")
    add_config_args(p)
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[transfer] {msg}", file=sys.stderr, flush=True)


def helper_embedding(helper_dir: str, helper_vocab_needed: int) -> np.ndarray:
    """The helper's input embedding matrix (host, float32), read as one tensor."""
    cfg = read_config(helper_dir)
    family = models.family(cfg.arch)
    spec = next(s for s in family.weight_specs(cfg) if s.paths == (("embed", "embedding"),))
    files = TensorFiles(helper_dir)
    key = hf_key(files, spec, family.BASE_PREFIX)
    if key is None:
        raise ClpError(f"{helper_dir}: checkpoint has no input embedding {family.BASE_PREFIX + spec.hf_name!r}")
    emb = np.asarray(files.get(key), dtype=np.float32)
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
            parts = [np.asarray(jax.device_get(_lookup(params, p))) for p in spec.paths]
            yield key, np.ascontiguousarray(spec.to_hf(*parts))
        elif cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # tied: transformers rebuilds it from the input embedding
        else:
            yield key, files.get(key)


def _lookup(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _report(cfg: TransferConfig, alignment: VocabAlignment, stats, timings: dict, target: TransformerConfig,
            source_cfg: TransformerConfig) -> dict:
    report = {
        "strategy": cfg.strategy, "source": os.path.abspath(cfg.source), "helper": os.path.abspath(cfg.helper),
        "source_vocab_size": source_cfg.vocab_size, "target_vocab_size": target.vocab_size,
        "tied_embeddings": target.tie_word_embeddings, "dtype": target.param_dtype,
        "alignment": alignment.to_report(), "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "config": config_to_dict(cfg),
    }
    if stats is not None:
        report.update(overlap=stats.n_overlap, missing=stats.n_missing, degenerate_rows=stats.n_degenerate,
                      degenerate_target_ids=[int(i) for i in stats.degenerate_target_ids[:1000]],
                      strategy_params=stats.params)
    else:
        report.update(overlap=0, missing=target.vocab_size, degenerate_rows=0)
    return report


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(TransferConfig, args, {
        "source": "source", "helper": "helper", "out": "out", "helper_tokenizer": "helper_tokenizer",
        "strategy": "strategy", "overwrite": "overwrite"})
    print_result(transfer(cfg))
    return 0


def transfer(cfg: TransferConfig) -> dict:
    """Run one transfer as configured; returns the summary printed as the command's JSON line."""
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise ClpError(f"{cfg.out}: output directory exists (pass --overwrite to replace it)")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source_cfg = read_config(cfg.source)
    source_tok = load_tokenizer(cfg.source)
    helper_tok_dir = cfg.helper_tokenizer or cfg.helper
    target_tok = load_tokenizer(helper_tok_dir)
    check_tokenizer_fits(source_tok, source_cfg.vocab_size, cfg.source)
    emb = helper_embedding(cfg.helper, len(target_tok))
    target_vocab = emb.shape[0]
    alignment = align_vocabularies(source_tok, target_tok, cfg.matching)
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
            block_size=cfg.block_size, top_k=cfg.top_k, temperature=cfg.temperature)
        jax.block_until_ready(params)
        timings["compute"] = time.perf_counter() - t
        if stats.n_degenerate:
            _say(f"{stats.n_degenerate} rows had a non-positive similarity sum; they got the fallback "
                 f"({stats.params.get('fallback', 'n/a')})")
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
    return {"out": cfg.out, "strategy": cfg.strategy, "overlap": len(alignment.target_ids),
            "target_vocab_size": target_vocab, "degenerate_rows": stats.n_degenerate if stats else 0,
            "seconds": round(timings["total"], 3)}


def _generation_config(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if not k.endswith("_token_id") and k != "transformers_version"}
