"""Benchmark the input pipeline against what training consumes, so input never stalls a step.

Read + tokenize + pack of the demo corpus (several languages, replicated to a few MB) with a byte-level BPE
tokenizer trained at the start: cold (empty token cache) and from the cache; then the mixture iterator's
batches. The training rate is measured as a jitted forward + backward of the demo-size GPT-2 (or given).
Prints a table to stderr and, last on stdout, one JSON line.

    python scripts/bench_data.py [--languages en,de,...] [--megabytes 4] [--train-tokens-per-s N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clp_jax.data.demo_corpus import demo_texts
from clp_jax.data.mixtures import MixtureConfig
from clp_jax.data.pipeline import DataConfig, build_data
from clp_jax.data.sources import SourceConfig


def write_corpus(folder: Path, languages: list[str], megabytes: float) -> tuple[list[SourceConfig], list[str], dict]:
    """One text file per language, the demo texts repeated to about `megabytes` in all; (sources, texts, copies)."""
    per_language = megabytes * 2**20 / len(languages)
    sources, originals, copies = [], [], {}
    for lang in languages:
        texts = demo_texts(lang)
        block = "\n".join(texts) + "\n"
        copies[lang] = max(1, round(per_language / len(block.encode("utf-8"))))
        path = folder / f"{lang}.txt"
        path.write_text(block * copies[lang], encoding="utf-8")
        sources.append(SourceConfig(name=lang, path=str(path), language=lang))
        originals.extend(texts)
    return sources, originals, copies


def train_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2 style byte-level BPE tokenizer (the demo's recipe)."""
    from clp_jax.demo import train_tokenizer as demo_tokenizer

    return demo_tokenizer(texts, vocab_size)


def timed_build(cfg: DataConfig, tokenizer) -> tuple[float, object]:
    start = time.perf_counter()
    data = build_data(cfg, tokenizer, process_index=0, process_count=1)
    return time.perf_counter() - start, data


def iterator_rate(data, steps: int) -> float:
    """Tokens (row slots) per second of the training iterator."""
    next(data.train)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(data.train)
    seconds = time.perf_counter() - start
    return steps * batch["tokens"].size / seconds


def train_rate(vocab_size: int, batch: int, seq_len: int, steps: int) -> float:
    """Tokens per second of a jitted forward + backward of the demo's helper GPT-2 (2 layers, width 128) on the
    default JAX device, with the train step's loss."""
    import jax
    import jax.numpy as jnp

    from clp_jax import models
    from clp_jax.demo import small_gpt2
    from clp_jax.train.step import loss_sums

    cfg = small_gpt2(vocab_size, layers=2, width=128, heads=2, positions=seq_len)
    params = models.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, (batch, seq_len)).astype(np.int32)
    batch_arrays = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(jnp.asarray(tokens)),
                    "positions": jnp.asarray(np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)))}

    def loss(p, b):
        total, count = loss_sums(p, cfg, b)
        return total / count

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params, batch_arrays))  # compile
    start = time.perf_counter()
    for _ in range(steps):
        out = step(params, batch_arrays)
    jax.block_until_ready(out)
    return steps * batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--languages", default="en,de,es,fr,it,pt")
    p.add_argument("--megabytes", type=float, default=4.0, help="corpus size after replication (default 4)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iterator-steps", type=int, default=500)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-tokens-per-s", type=float, default=None,
                   help="training consumption rate (default: measure the demo GPT-2 here)")
    args = p.parse_args()
    languages = args.languages.split(",")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        sources, originals, copies = write_corpus(Path(tmp), languages, args.megabytes)
        size_mb = sum(Path(s.path).stat().st_size for s in sources) / 2**20
        log(f"demo corpus: {len(originals):,} utterances in {len(languages)} languages, each replicated "
            f"{min(copies.values())}-{max(copies.values())}x to {size_mb:.1f} MB")
        tokenizer = train_tokenizer(originals, args.vocab_size)
        cfg = DataConfig(sources=sources, mixture=MixtureConfig(kind="temperature", alpha=0.3),
                         seq_len=args.seq_len, batch_size=args.batch_size, cache_dir=str(Path(tmp) / "cache"))
        cold_s, data = timed_build(cfg, tokenizer)
        cached_s, data = timed_build(cfg, tokenizer)
        assert all(s.from_cache for s in data.summaries), "second build should read the token cache"
        tokens = sum(s.tokens + s.eval_tokens for s in data.summaries)
        iter_rate = iterator_rate(data, args.iterator_steps)
    measured = args.train_tokens_per_s is None
    train = train_rate(args.vocab_size, args.batch_size, args.seq_len, args.train_steps) if measured \
        else args.train_tokens_per_s
    result = {"corpus_mb": round(size_mb, 2), "tokens": tokens, "cold_seconds": round(cold_s, 3),
              "cached_seconds": round(cached_s, 3), "cold_tokens_per_s": round(tokens / cold_s),
              "cached_tokens_per_s": round(tokens / cached_s), "iterator_tokens_per_s": round(iter_rate),
              "train_tokens_per_s": round(train), "train_rate_measured": measured}
    result["ratio_vs_train"] = round(min(result["cold_tokens_per_s"], result["cached_tokens_per_s"], iter_rate)
                                     / train, 1)
    log(f"{'stage':<38} {'tokens/s':>14} {'x train':>8}")
    for name, key in (("read+tokenize+pack, cold", "cold_tokens_per_s"),
                      ("read+pack from token cache", "cached_tokens_per_s"),
                      (f"iterator ({args.batch_size}x{args.seq_len} batches)", "iterator_tokens_per_s"),
                      (f"train fwd+bwd ({'measured' if measured else 'given'})", "train_tokens_per_s")):
        log(f"{name:<38} {result[key]:>14,} {result[key] / train:>8.1f}")
    log(f"{tokens:,} tokens; iterator {iter_rate / (args.batch_size * args.seq_len):,.0f} batches/s; "
        f"input/train ratio {result['ratio_vs_train']}x (target >= 10x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
