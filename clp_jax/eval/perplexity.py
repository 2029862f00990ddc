"""Perplexity and bits per byte of a causal LM on documents: next-token cross-entropy in nats, and in bits
per UTF-8 byte of the text the predicted tokens cover (comparable across tokenizers).

Contract: each document is encoded as ``tokenizer(text)`` encodes it, truncated to ``seq_len``
tokens, never packed with another document; documents under 2 tokens are skipped. Tokens 1..n-1 of a
document are predicted; the bytes they cover are those of ``clp_jax.data.tokenize.token_bytes`` on the whole
encoding, summed over tokens 1..n-1: the text from the end of token 0's character span (0 when token 0 is a
special token such as BOS, whose span is empty) to the end of token n-1's span, or to the end of the text when
nothing was truncated. So an untruncated document with BOS covers all its UTF-8 bytes, and one without BOS
all but those of its first token's span. Batch size and padding do not change the result: per-document sums
come back from the device and are added in float64 on the host in document order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from clp_jax import models
from clp_jax import progress as progress_bars
from clp_jax.data.tokenize import encode_with_bytes
from clp_jax.errors import ClpError
from clp_jax.files import read_lines
from clp_jax.hf.reader import load_params, read_config
from clp_jax.hf.tokenizer import check_tokenizer_fits, load_tokenizer
from clp_jax.memory import device_budget, format_bytes
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import batch_divisor, batch_sharding, tree_shardings
from clp_jax.train.loss import row_nll_sums, token_targets


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    loss: float
    ppl: float
    bits_per_byte: float | None  # None without byte counts
    tokens: int  # predicted positions
    bytes: int | None  # UTF-8 bytes the predicted tokens cover
    documents: int
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bits_per_byte(nll: float, num_bytes: float) -> float:
    """Summed next-token loss in nats over the UTF-8 bytes the predicted tokens cover, in bits per byte."""
    return nll / (math.log(2) * num_bytes) if num_bytes else float("nan")


def encode_documents(tokenizer: Any, texts: Sequence[str],
                     seq_len: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Token ids per non-empty text (tokenizer defaults, truncated to seq_len), the bytes each document's
    predicted tokens cover (module docstring), and how many documents were skipped."""
    texts = [t for t in texts if t.strip()]
    docs, covered, skipped = [], [], 0
    for start in range(0, len(texts), 1024):
        batch, nbytes = encode_with_bytes(tokenizer, texts[start:start + 1024])
        firsts = np.cumsum([0] + [len(ids) for ids in batch])
        for ids, first in zip(batch, firsts):
            ids = np.asarray(ids[:seq_len], dtype=np.int32)
            if len(ids) < 2:
                skipped += 1
            else:
                docs.append(ids)
                covered.append(int(nbytes[first + 1:first + len(ids)].sum()))  # tokens 1..n-1 after truncation
    return docs, np.asarray(covered, np.int64), skipped


def token_nll(params: Any, cfg: TransformerConfig, tokens: jax.Array, segment_ids: jax.Array) -> tuple:
    """Per-row sum of next-token negative log-likelihood (float32) and predicted-token counts: the train loss's
    targets and nll (``train.loss``), summed per document instead of over the batch."""
    hidden = models.hidden_states(params, cfg, tokens, segment_ids=segment_ids)
    targets, weights = token_targets(tokens, segment_ids)
    w, vocab_major = models.output_layer(params, cfg)
    nll = row_nll_sums(hidden, w, targets, weights, cfg.logits_chunk, vocab_major, cfg.final_softcap)
    return nll, weights.sum(axis=1).astype(jnp.int32)


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


@functools.lru_cache(maxsize=16)
def _document_step(cfg: TransformerConfig, mesh: Mesh, rows: int) -> tuple[Callable, NamedSharding]:
    # One jitted function per (architecture, mesh, rows): evaluating many models of one shape (a study's
    # strategies, a run's checkpoints) traces and compiles each batch shape once.
    p_shard = tree_shardings(models.param_axes(cfg), models.param_shapes(cfg), mesh)
    b = batch_sharding(mesh, (rows, 1))
    return jax.jit(lambda p, tokens, seg: token_nll(p, cfg, tokens, seg), in_shardings=(p_shard, b, b)), b


def make_document_step(cfg: TransformerConfig, mesh: Mesh, rows: int) -> Callable:
    """``token_nll`` jit-compiled with parameter and batch shardings from the rules table: per-document sums."""
    fn, b = _document_step(cfg, mesh, rows)
    return lambda p, tokens, seg: fn(p, jax.device_put(tokens, b), jax.device_put(seg, b))


def eval_rows(mesh: Mesh, batch_size: int) -> int:
    """Rows of each eval batch: ``batch_size`` rounded up to a multiple of the batch devices."""
    divisor = batch_divisor(mesh)
    return -(-batch_size // divisor) * divisor


def _eval_bytes(cfg: TransformerConfig, mesh: Mesh, length: int) -> tuple[float, float]:
    """(bytes per batch row, bytes of the parameter share) on one device, for batches of ``length`` tokens."""
    tensor = mesh.shape["tensor"]
    act = jnp.dtype(cfg.compute_dtype).itemsize
    per_token = 4 * cfg.vocab_size / tensor + act * (4 * cfg.hidden_size + (2 * cfg.intermediate_size
                                                                            + cfg.num_heads * length) / tensor)
    params = cfg.num_params() * jnp.dtype(cfg.weight_dtype).itemsize / (mesh.shape["fsdp"] * tensor)
    return length * per_token, params


def eval_device_bytes(cfg: TransformerConfig, mesh: Mesh, batch_size: int, length: int) -> int:
    """Rough bytes one device needs for an eval batch of ``length`` tokens: its rows' float32 logits, one layer's
    activations and attention scores, and its share of the parameters (XLA's other temporaries come on top)."""
    per_row, params = _eval_bytes(cfg, mesh, length)
    return int(eval_rows(mesh, batch_size) // batch_divisor(mesh) * per_row + params)


def check_eval_fits(cfg: TransformerConfig, mesh: Mesh, batch_size: int, length: int) -> None:
    """A ClpError, before anything is compiled, when ``eval_device_bytes`` exceeds a device's free memory; it
    names the largest batch size that fits."""
    budget = device_budget(mesh)
    need = eval_device_bytes(cfg, mesh, batch_size, length)
    if budget is None or need <= budget[0]:
        return
    free, source = budget
    per_row, params = _eval_bytes(cfg, mesh, length)
    fits = max(int((free - params) // per_row), 0) * batch_divisor(mesh)
    advice = (f"pass --batch-size {fits} or less" if fits else
              f"even {batch_divisor(mesh)} documents (one per batch device) do not fit; pass a smaller --seq-len")
    raise ClpError(f"eval batch of {batch_size} documents x {length} tokens needs about {format_bytes(need)} per "
                   f"device (float32 logits over {cfg.vocab_size} tokens, activations, parameters) but only "
                   f"{format_bytes(free)} are free ({source}); {advice}")


def perplexity(params: Any, cfg: TransformerConfig, mesh: Mesh, docs: list[np.ndarray], *, batch_size: int = 8,
               seq_len: int = 1024, skipped: int = 0, covered_bytes: Sequence[int] | None = None,
               progress: bool = True) -> PerplexityResult:
    """Loss, perplexity and (given each document's ``covered_bytes``) bits per byte over ``docs`` (1-D token ids).

    The compiled step is shared by every model of ``cfg``'s architecture on ``mesh`` (``make_document_step``).
    """
    divisor = batch_divisor(mesh)
    step = make_document_step(cfg, mesh, eval_rows(mesh, batch_size))
    nll = np.zeros(len(docs), np.float64)
    count = np.zeros(len(docs), np.int64)
    total_tokens = sum(len(d) - 1 for d in docs)
    with progress_bars.bar(total=total_tokens, desc="eval", unit="tok", disable=not progress, leave=False) as bar:
        for idx, tokens, seg in _batches(docs, batch_size, divisor, seq_len):
            sums, counts = jax.device_get(step(params, tokens, seg))
            nll[idx] = sums[:len(idx)]
            count[idx] = counts[:len(idx)]
            bar.update(int(counts[:len(idx)].sum()))
    tokens = int(count.sum())
    loss = float(nll.sum() / tokens) if tokens else float("nan")
    num_bytes = None if covered_bytes is None else int(np.sum(covered_bytes, dtype=np.int64))
    return PerplexityResult(loss=loss, ppl=math.exp(loss) if tokens else float("nan"),
                            bits_per_byte=None if num_bytes is None else bits_per_byte(float(nll.sum()), num_bytes),
                            tokens=tokens, bytes=num_bytes, documents=len(docs), skipped=skipped)


def evaluate_model_dir(model_dir: str, texts: Sequence[str] | str, mesh: Mesh, *, seq_len: int = 1024,
                       batch_size: int = 8, dtype: str = "float32", data_name: str = "data",
                       progress: bool = True) -> PerplexityResult:
    """Loss and bits per byte of an HF model dir on ``texts`` under the module's contract (what `clp-jax eval` runs).

    ``texts`` may be a text file's path (one document per line, read once the model dir checks out);
    ``data_name`` names given texts in errors.
    """
    model_cfg = read_config(model_dir, dtype=dtype)
    if model_cfg.position == "learned" and seq_len > model_cfg.max_position_embeddings:
        raise ClpError(f"{model_dir}: seq_len {seq_len} exceeds the model's {model_cfg.max_position_embeddings} "
                       "learned positions; pass --seq-len with a smaller value")
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(tokenizer, model_cfg.vocab_size, model_dir)
    if isinstance(texts, str):
        texts, data_name = read_lines(texts), texts
    docs, covered, skipped = encode_documents(tokenizer, texts, seq_len)
    if not docs:
        raise ClpError(f"{data_name}: no document has 2 or more tokens")
    batch_size = min(batch_size, len(docs))  # rows past the documents would only be padding
    check_eval_fits(model_cfg, mesh, batch_size, _bucket(max(len(d) for d in docs), seq_len))
    model_cfg, params = load_params(model_dir, mesh, model_cfg, progress=progress)
    return perplexity(params, model_cfg, mesh, docs, batch_size=batch_size, seq_len=seq_len, skipped=skipped,
                      covered_bytes=covered, progress=progress)
