"""Perplexity of a causal LM on documents: token-weighted mean next-token cross-entropy in nats.

Contract: each document is encoded as ``tokenizer(text)`` encodes it, truncated to ``seq_len``
tokens, never packed with another document; documents under 2 tokens are skipped. Batch size and
padding do not change the result: per-document sums come back from the device and are added in
float64 on the host in document order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from clp_jax import models
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import batch_divisor, batch_sharding, tree_shardings


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    loss: float
    ppl: float
    tokens: int  # predicted positions
    documents: int
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def encode_documents(tokenizer: Any, texts: Sequence[str], seq_len: int) -> tuple[list[np.ndarray], int]:
    """Token ids per non-empty text (tokenizer defaults, truncated to seq_len); returns (docs, skipped)."""
    texts = [t for t in texts if t.strip()]
    docs, skipped = [], 0
    for start in range(0, len(texts), 1024):
        for ids in tokenizer(list(texts[start:start + 1024]))["input_ids"]:
            ids = np.asarray(ids[:seq_len], dtype=np.int32)
            if len(ids) < 2:
                skipped += 1
            else:
                docs.append(ids)
    return docs, skipped


def token_nll(params: Any, cfg: TransformerConfig, tokens: jax.Array, segment_ids: jax.Array) -> tuple:
    """Per-row sum of next-token negative log-likelihood (float32) and predicted-token counts."""
    logits = models.apply(params, cfg, tokens, segment_ids=segment_ids)[:, :-1]
    targets = tokens[:, 1:]
    weights = (segment_ids[:, 1:] != 0) & (segment_ids[:, 1:] == segment_ids[:, :-1])
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(weights, logz - picked, 0.0)
    return nll.sum(axis=1), weights.sum(axis=1)


def _bucket(n: int, seq_len: int) -> int:
    """Pad lengths to a few shapes (multiples of 64, or powers of two below) to bound recompiles."""
    b = 8
    while b < min(n, 64):
        b *= 2
    if n > 64:
        b = -(-n // 64) * 64
    return min(max(b, n), max(seq_len, n))


def _batches(docs: list[np.ndarray], batch_size: int, divisor: int, seq_len: int) -> Iterator[tuple]:
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    rows = -(-batch_size // divisor) * divisor
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        t = _bucket(len(docs[idx[0]]), seq_len)
        tokens = np.zeros((rows, t), np.int32)
        seg = np.zeros((rows, t), np.int32)
        for r, i in enumerate(idx):
            tokens[r, :len(docs[i])] = docs[i]
            seg[r, :len(docs[i])] = 1
        yield idx, tokens, seg


def make_eval_step(cfg: TransformerConfig, mesh: Mesh, params: Any, rows: int) -> Callable:
    """``token_nll`` jit-compiled with parameter and batch shardings from the rules table."""
    p_shard = tree_shardings(models.param_axes(cfg), params, mesh)
    b = batch_sharding(mesh, (rows, 1))
    fn = jax.jit(lambda p, tokens, seg: token_nll(p, cfg, tokens, seg), in_shardings=(p_shard, b, b))
    return lambda p, tokens, seg: fn(p, jax.device_put(tokens, b), jax.device_put(seg, b))


def perplexity(params: Any, cfg: TransformerConfig, mesh: Mesh, docs: list[np.ndarray], *, batch_size: int = 8,
               seq_len: int = 1024, skipped: int = 0, progress: bool = True) -> PerplexityResult:
    """Loss and perplexity over ``docs`` (each a 1-D array of token ids)."""
    divisor = batch_divisor(mesh)
    step = make_eval_step(cfg, mesh, params, -(-batch_size // divisor) * divisor)
    nll = np.zeros(len(docs), np.float64)
    count = np.zeros(len(docs), np.int64)
    total_tokens = sum(len(d) - 1 for d in docs)
    with tqdm(total=total_tokens, desc="eval", unit="tok", disable=not progress, leave=False) as bar:
        for idx, tokens, seg in _batches(docs, batch_size, divisor, seq_len):
            sums, counts = jax.device_get(step(params, tokens, seg))
            nll[idx] = sums[:len(idx)]
            count[idx] = counts[:len(idx)]
            bar.update(int(counts[:len(idx)].sum()))
    tokens = int(count.sum())
    loss = float(nll.sum() / tokens) if tokens else float("nan")
    return PerplexityResult(loss=loss, ppl=math.exp(loss) if tokens else float("nan"), tokens=tokens,
                            documents=len(docs), skipped=skipped)
