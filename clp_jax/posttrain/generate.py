"""Batched generation with a KV cache under jit: greedy, or temperature / top-k sampling, stopping at EOS.

Convention: prompts are LEFT-padded to a bucketed length P (so every row's last prompt token sits in slot
P - 1 and every step writes one shared cache slot); each row's positions (learned, RoPE or ALiBi) start at
0 at its first real token, and pad slots are never attended to. The prompt is prefilled in one call, then
one token per step in a ``jax.lax.while_loop`` that ends when every row has produced EOS or after
``max_new_tokens``. Returned completions exclude the prompt and are cut before the first EOS (EOS
excluded), so a completion shorter than ``max_new_tokens`` ended with EOS. Sliding-window models work
(the window is applied in the mask; the cache keeps every slot).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clp_jax import models
from clp_jax.data.sft import format_examples
from clp_jax.errors import ClpError
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import batch_divisor, named_sharding, tree_shardings


def bucket_length(n: int) -> int:
    """Prompt lengths padded to powers of two from 8 to 64, then multiples of 64, to bound recompiles."""
    if n > 64:
        return -(-n // 64) * 64
    b = 8
    while b < n:
        b *= 2
    return b


def _pick(logits: jax.Array, temperature: jax.Array, top_k: int | None, key: jax.Array) -> jax.Array:
    """Next token per row: argmax when temperature <= 0, else a sample from softmax(logits / temperature)."""
    greedy = jnp.argmax(logits, axis=-1)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _decoder(cfg: TransformerConfig, max_new_tokens: int, top_k: int | None, mesh: Mesh | None) -> Callable:
    """The jit-compiled prefill + decode loop (jax re-traces per batch and prompt length only)."""
    n = max_new_tokens

    def constrain(cache: dict) -> dict:
        if mesh is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, tree_shardings(models.cache_axes(cfg), cache, mesh))

    def run(params: Any, tokens: jax.Array, lengths: jax.Array, eos: jax.Array, pad: jax.Array,
            temperature: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, p = tokens.shape
        start = (p - lengths)[:, None]
        slots = jnp.arange(p, dtype=jnp.int32)[None]
        segment_ids = (slots >= start).astype(jnp.int32)
        positions = jnp.maximum(slots - start, 0)
        cache = constrain(models.init_cache(cfg, b, p + n - 1))
        logits, cache = models.apply_cached(params, cfg, tokens, positions, segment_ids, cache, 0)
        token = _pick(logits[:, -1], temperature, top_k, jax.random.fold_in(key, 0))
        token = jnp.where(lengths > 0, token, pad)
        done = jnp.isin(token, eos) | (lengths == 0)
        out = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(token)

        def cond(state: tuple) -> jax.Array:
            step, _, _, _, done = state
            return (step < n) & ~jnp.all(done)

        def body(state: tuple) -> tuple:
            step, out, cache, token, done = state
            logits, cache = models.apply_cached(params, cfg, token[:, None], (lengths + step - 1)[:, None],
                                                jnp.ones((b, 1), jnp.int32), cache, p + step - 1)
            token = _pick(logits[:, -1], temperature, top_k, jax.random.fold_in(key, step))
            token = jnp.where(done, pad, token)
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
            return step + 1, out, constrain(cache), token, done | jnp.isin(token, eos)

        steps, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, token, done))
        return out, steps

    return jax.jit(run)


def generate_arrays(params: Any, cfg: TransformerConfig, tokens: np.ndarray, lengths: np.ndarray, *,
                    max_new_tokens: int, eos_id: int | Sequence[int] | None, pad_id: int, temperature: float = 0.0,
                    top_k: int | None = None, seed: int = 0, mesh: Mesh | None = None) -> tuple[np.ndarray, int]:
    """New tokens [B, max_new_tokens] (pad after EOS) of left-padded prompts, and the decode steps run.

    Rows of length 0 are inert filler (all pad, done from the start).
    """
    if max_new_tokens < 1:
        raise ClpError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ClpError(f"top_k must be between 1 and the vocabulary size {cfg.vocab_size}, got {top_k}")
    eos_ids = [] if eos_id is None else [int(e) for e in np.atleast_1d(eos_id)]
    eos = np.full(max(4, -(-len(eos_ids) // 4) * 4), -1, np.int32)  # padded: few shapes, few recompiles
    eos[:len(eos_ids)] = eos_ids
    tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
    if mesh is not None:
        tokens, lengths = jax.device_put((tokens, lengths), (named_sharding(("batch", "length"), tokens.shape, mesh),
                                                             named_sharding(("batch",), lengths.shape, mesh)))
    fn = _decoder(cfg, max_new_tokens, top_k, mesh)
    out, steps = fn(params, tokens, lengths, eos, np.int32(pad_id), np.float32(temperature), jax.random.key(seed))
    return np.asarray(jax.device_get(out)), int(steps)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-aligned in a [rows, bucket_length(longest)] array, and their lengths (0 for filler rows)."""
    p = bucket_length(max(len(ids) for ids in prompt_ids))
    tokens = np.full((rows, p), pad_id, np.int32)
    lengths = np.zeros(rows, np.int32)
    for r, ids in enumerate(prompt_ids):
        if ids:
            tokens[r, p - len(ids):] = ids
        lengths[r] = len(ids)
    return tokens, lengths


def _cut(row: np.ndarray, eos: set[int]) -> list[int]:
    row = row.tolist()
    stop = next((i for i, t in enumerate(row) if t in eos), len(row))
    return row[:stop]


def generate(params: Any, cfg: TransformerConfig, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_id: int | Sequence[int] | None, pad_id: int, temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0, mesh: Mesh | None = None) -> list[list[int]]:
    """New token ids per prompt (prompt and EOS excluded, cut at the first EOS); temperature 0 is greedy."""
    if not prompt_ids:
        return []
    empty = [i for i, ids in enumerate(prompt_ids) if not len(ids)]
    if empty:
        raise ClpError(f"prompt {empty[0]} has no tokens; generation needs at least one")
    longest = max(len(ids) for ids in prompt_ids)
    if cfg.position == "learned" and longest + max_new_tokens - 1 > cfg.max_position_embeddings:
        raise ClpError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens needs more than the model's "
                       f"{cfg.max_position_embeddings} learned positions; shorten it or lower max_new_tokens")
    divisor = 1 if mesh is None else batch_divisor(mesh)
    rows = -(-len(prompt_ids) // divisor) * divisor
    tokens, lengths = left_pad(prompt_ids, pad_id, rows)
    out, _ = generate_arrays(params, cfg, tokens, lengths, max_new_tokens=max_new_tokens, eos_id=eos_id,
                             pad_id=pad_id, temperature=temperature, top_k=top_k, seed=seed, mesh=mesh)
    eos = set() if eos_id is None else {int(e) for e in np.atleast_1d(eos_id)}
    return [_cut(out[r], eos) for r in range(len(prompt_ids))]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Prompt ids: the tokenizer's defaults, or with ``chat`` the SFT prompt format (chat template + generation
    prompt when the tokenizer has one, else ``prompt + "\\n"``)."""
    if not prompts:
        return []
    if chat:
        return [list(p) for p, _ in format_examples(tokenizer, [(text, "") for text in prompts])]
    return [list(ids) for ids in tokenizer(list(prompts), return_attention_mask=False)["input_ids"]]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (pad only fills slots nobody reads)."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0
