"""Flax decoder models (GPT-2, Llama family, BLOOM, Gemma 3) as pure functions over plain parameter dicts."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clp_jax.models import bloom, gemma3, gpt2, llama
from clp_jax.models.config import TransformerConfig
from clp_jax.models.transformer import Transformer

_FAMILIES: tuple[ModuleType, ...] = (gpt2, llama, bloom, gemma3)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in _FAMILIES for t in f.MODEL_TYPES)

__all__ = ["SUPPORTED_MODEL_TYPES", "Transformer", "TransformerConfig", "apply", "apply_cached", "cache_axes",
           "family", "hidden_states", "init_cache", "init_params", "output_layer", "param_axes", "param_shapes"]


def family(name: str) -> ModuleType:
    """The module (gpt2, llama, bloom, gemma3) handling an HF ``model_type`` or our ``arch``."""
    for f in _FAMILIES:
        if name in f.MODEL_TYPES or name == f.__name__.rsplit(".", 1)[-1]:
            return f
    raise ValueError(f"unsupported model_type {name!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


@functools.lru_cache(maxsize=64)
def _boxed_shapes(cfg: TransformerConfig) -> Any:
    """The boxed (logical-axis-annotated) parameter shapes; cached: tracing the init costs ~0.1 s per call."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens))["params"]


def param_axes(cfg: TransformerConfig) -> Any:
    """Tree of logical axis-name tuples, one per parameter (the input of ``sharding.tree_shardings``)."""
    specs = nn.get_partition_spec(_boxed_shapes(cfg))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def param_shapes(cfg: TransformerConfig) -> Any:
    """Tree of ``jax.ShapeDtypeStruct`` for every parameter, without allocating."""
    return nn.meta.unbox(_boxed_shapes(cfg))


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: TransformerConfig, rng: jax.Array) -> Any:
    """Random parameters (normal(initializer_range), GPT-2's depth-scaled output projections); one compiled
    program, not an op-by-op dispatch of every initializer."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(Transformer(cfg).init(rng, tokens)["params"])


def apply(params: Any, cfg: TransformerConfig, tokens: jax.Array, positions: jax.Array | None = None,
          segment_ids: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, T, vocab]; segment id 0 marks padding, equal ids attend within a document."""
    return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids)


def hidden_states(params: Any, cfg: TransformerConfig, tokens: jax.Array, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states [B, T, embed] (compute dtype) that the output layer maps to logits."""
    return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids, return_hidden=True)


def output_layer(params: Any, cfg: TransformerConfig) -> tuple[jax.Array, bool]:
    """(output weight in the compute dtype, vocab_major): the tied [vocab, embed] table or lm_head [embed, vocab]."""
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].astype(cfg.compute_dtype), True
    return params["lm_head"]["kernel"].astype(cfg.compute_dtype), False


def init_cache(cfg: TransformerConfig, batch: int, length: int) -> dict:
    """An empty KV cache: per-layer k/v [B, L, KV, D] in the compute dtype, slot positions [B, L] all -1."""
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    kv = [{"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
          for _ in range(cfg.num_layers)]
    return {"positions": jnp.full((batch, length), -1, jnp.int32), "layers": kv}


def cache_axes(cfg: TransformerConfig) -> dict:
    """Logical axis names of every cache array, in the tree layout of ``init_cache``."""
    kv = ("batch", "length", "kv_heads", "head_dim")
    return {"positions": ("batch", "length"), "layers": [{"k": kv, "v": kv} for _ in range(cfg.num_layers)]}


def apply_cached(params: Any, cfg: TransformerConfig, tokens: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array, cache: dict, cache_index: jax.Array | int,
                 last_only: bool = True) -> tuple[jax.Array, dict]:
    """Logits (of the last position by default) and the updated cache after writing ``tokens`` at ``cache_index``.

    Segment id 0 marks padding: those slots are never attended to.
    """
    return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids, cache=cache,
                                  cache_index=jnp.asarray(cache_index, jnp.int32), last_only=last_only)
