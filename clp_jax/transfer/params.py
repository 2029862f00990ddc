"""CLP-Transfer on parameter trees: ``params -> params`` with the target vocabulary's embeddings.

Only the input embedding (and the untied output embedding, built with the same weights from the
source's lm_head rows) change; every other parameter is the source's, untouched.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from clp_jax import models
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import tree_shardings
from clp_jax.transfer.align import VocabAlignment
from clp_jax.transfer.embeddings import TransferStats, init_target_embeddings
from clp_jax.transfer.validate import ALL_STRATEGIES, DEFAULT_STRATEGY

STRATEGIES = ALL_STRATEGIES
EMBEDDING_PATHS = (("embed", "embedding"), ("lm_head", "kernel"))


def embedding_paths(cfg: TransformerConfig) -> tuple[tuple[str, ...], ...]:
    """Parameters that depend on the vocabulary: the input embedding, and lm_head when untied."""
    return EMBEDDING_PATHS[:1] if cfg.tie_word_embeddings else EMBEDDING_PATHS


def transfer_params(params: dict, cfg: TransformerConfig, helper_embedding: Any, alignment: VocabAlignment,
                    target_vocab_size: int, *, strategy: str = DEFAULT_STRATEGY, mesh: Mesh,
                    **options: Any) -> tuple[dict, TransformerConfig, TransferStats]:
    """Target-language parameters: ``params`` with its embedding matrices re-initialized for the target vocab.

    ``params`` needs only the embedding subtrees; any other entries pass through unchanged. ``options`` are
    ``init_target_embeddings``'s keywords (seed, block_size, top_k, pieces, center_helper, match_norms, ...).
    """
    source = [params["embed"]["embedding"]]
    if not cfg.tie_word_embeddings:
        source.append(params["lm_head"]["kernel"].T)  # [E, V] -> rows per token
    outputs, stats = init_target_embeddings(
        strategy, source, helper_embedding, alignment.target_ids, alignment.source_ids, target_vocab_size,
        mesh=mesh, **options)
    new = {k: v for k, v in params.items()}
    new["embed"] = {**params["embed"], "embedding": outputs[0]}
    if not cfg.tie_word_embeddings:
        new["lm_head"] = {**params["lm_head"], "kernel": outputs[1].T}
    return new, cfg.replace(vocab_size=target_vocab_size), stats


def from_scratch_params(cfg: TransformerConfig, target_vocab_size: int, mesh: Mesh, seed: int = 0) -> tuple:
    """The whole target model randomly initialized in the source architecture (the paper's baseline)."""
    target = cfg.replace(vocab_size=target_vocab_size)
    shardings = tree_shardings(models.param_axes(target), models.param_shapes(target), mesh)
    params = jax.jit(lambda key: models.init_params(target, key), out_shardings=shardings)(jax.random.key(seed))
    return params, target
