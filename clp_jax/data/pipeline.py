"""From a run's `data:` config to batches: read and tokenize every source (cached), hold out eval documents,
pack (pretraining) or format prompt/response rows (SFT), resolve the mixture and build the step-indexed iterator.

Every input problem (a source with no documents, all-zero weights, a batch the hosts cannot split) is a
ClpError raised here, before training starts. Mixture keys are source names (`english_plus_n` also takes
language codes). Sizes are training tokens (pretraining) or training examples (SFT); the iterator samples rows
by the mixture's shares, so a share of rows is a share of tokens up to each source's padding.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from clp_jax.config import ConfigModel
from clp_jax.data.iterator import MixtureIterator, process_shard
from clp_jax.data.mixtures import Mixture, MixtureConfig, build_mixture
from clp_jax.data.packing import pack_documents
from clp_jax.data.sft import format_examples, response_bytes, sft_batch
from clp_jax.data.sources import SourceConfig, SourceData, read_source
from clp_jax.data.tokenize import tokenize_source
from clp_jax.errors import ClpError

Rows = dict[str, np.ndarray]


def _proportional() -> MixtureConfig:
    return MixtureConfig(kind="temperature", alpha=1.0)


class DataConfig(ConfigModel):
    """The data of a run: its sources, how to mix them, batch shape, seed, token cache and held-out documents."""

    sources: list[SourceConfig] = Field(min_length=1)
    mixture: MixtureConfig = Field(default_factory=_proportional)  # default: proportional to size
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(16, ge=1)  # global, over all hosts
    seed: int = Field(0, ge=0)
    cache_dir: str | None = None
    eval_documents: int = Field(64, ge=0)  # per source, held out of training for per-language eval loss
    mode: Literal["pretrain", "sft"] = "pretrain"
    pack_sft: bool = False  # SFT: several examples per row instead of one

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        names = [s.name for s in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(repeated)}")
        wrong = [s.name for s in self.sources if s.pairs != (self.mode == "sft")]
        if wrong:
            need = "prompt/response pairs (task other than 'lm')" if self.mode == "sft" else "texts (task 'lm')"
            raise ValueError(f"mode '{self.mode}' needs sources of {need}; not so: {', '.join(wrong)}")
        return self


@dataclass
class SourceSummary:
    """What one source contributed: documents read, skipped and held out, training tokens and rows."""

    name: str
    language: str
    documents: int
    skipped: int
    eval_documents: int
    tokens: int  # training tokens (SFT: prompt + response tokens of training examples)
    eval_tokens: int
    rows: int  # training rows of seq_len
    size: float  # mixture units: training tokens (pretrain) or examples (SFT)
    from_cache: bool
    seconds: float


def holdout_mask(keys: Sequence[str], count: int) -> np.ndarray:
    """Documents held out: those whose text is one of the `count` distinct texts of smallest hash.

    Independent of order, and duplicates of a held-out text are held out too, so none leaks into training.
    """
    if count == 0:
        return np.zeros(len(keys), dtype=bool)
    hashes = np.fromiter((int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8)
                                         .digest(), "little") for k in keys), np.uint64, count=len(keys))
    return np.isin(hashes, np.unique(hashes)[:count])


def _split_tokens(tokens: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flat tokens (or any per-token array) and offsets of the documents where `keep` is true."""
    lengths = np.diff(offsets)
    new_offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=new_offsets[1:])
    return np.asarray(tokens)[np.repeat(keep, lengths)], new_offsets


def _pretrain_rows(data: SourceData, held: np.ndarray, cfg: DataConfig, tokenizer: Any,
                   eos_id: int) -> tuple[Rows, Rows, int, int, bool]:
    """(train rows, eval rows with `bytes`, train tokens, eval tokens, from cache) of one text source."""
    tok = tokenize_source(data, tokenizer, cfg.cache_dir)
    tokens, offsets = tok.tokens, tok.offsets
    if held.any():
        eval_tokens, eval_offsets = _split_tokens(tokens, offsets, held)
        eval_bytes, _ = _split_tokens(tok.token_bytes, offsets, held)
        tokens, offsets = _split_tokens(tokens, offsets, ~held)
    else:
        eval_tokens, eval_bytes, eval_offsets = np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64)
    train = pack_documents(tokens, offsets, cfg.seq_len, eos_id).as_dict()
    held_out = pack_documents(eval_tokens, eval_offsets, cfg.seq_len, eos_id, token_bytes=eval_bytes).as_dict()
    return train, held_out, int(offsets[-1]), int(eval_offsets[-1]), tok.stats.from_cache


def _sft_rows(data: SourceData, held: np.ndarray, cfg: DataConfig, tokenizer: Any,
              pad_id: int) -> tuple[Rows, Rows, int, int, bool]:
    """(train rows, eval rows with `bytes`, train tokens, eval tokens, from cache) of one prompt/response source."""
    pairs = [(d.inputs, d.targets) for d in data.documents]
    examples = format_examples(tokenizer, pairs)
    train = [e for e, h in zip(examples, held) if not h]
    held_out = [e for e, h in zip(examples, held) if h]
    held_bytes = response_bytes(tokenizer, [p for p, h in zip(pairs, held) if h])

    def count(xs: list) -> int:
        return sum(len(p) + len(r) for p, r in xs)

    return (sft_batch(train, cfg.seq_len, pad_id, pack=cfg.pack_sft),
            sft_batch(held_out, cfg.seq_len, pad_id, pack=cfg.pack_sft, response_bytes=held_bytes),
            count(train), count(held_out), False)


def _document_key(doc: Any) -> str:
    return doc.text if doc.text is not None else f"{doc.inputs}\x00{doc.targets}"


class Data:
    """A run's data: the `train` iterator, held-out `eval_sets` per source, the resolved `mixture`, a report."""

    def __init__(self, cfg: DataConfig, train: MixtureIterator, mixture: Mixture, eval_sets: dict[str, Rows],
                 summaries: list[SourceSummary], steps: int | None = None) -> None:
        self.cfg, self.train, self.mixture, self.eval_sets = cfg, train, mixture, eval_sets
        self.summaries, self.steps = summaries, steps

    def shares(self) -> dict[str, float]:
        """Each source's share of the rows drawn (its mixture weight)."""
        return {n: float(w) for n, w in zip(self.mixture.names, self.mixture.weights)}

    def expected_epochs(self) -> dict[str, float | None]:
        """Passes over each source's rows in `steps` steps; without steps, the mixture budget's epochs (or None)."""
        if self.steps is not None:
            drawn = self.steps * self.cfg.batch_size
            return {s.name: drawn * self.shares()[s.name] / s.rows if s.rows else 0.0 for s in self.summaries}
        if self.mixture.budget is not None:
            return dict(self.mixture.epochs())
        return {s.name: None for s in self.summaries}

    def eval_batches(self, name: str, batch_size: int | None = None) -> Iterator[Rows]:
        """This host's slice of global batches of a source's held-out rows; the last is padded (segment 0)."""
        if name not in self.eval_sets:
            raise ClpError(f"no eval set named '{name}' (sources: {', '.join(self.eval_sets)})")
        rows = self.eval_sets[name]
        size = self.cfg.batch_size if batch_size is None else batch_size
        index, count = self.train.process_index, self.train.process_count
        if size < 1 or size % count:
            raise ClpError(f"eval batch size {size} must be a positive multiple of the {count} processes (hosts)")
        per_host = size // count
        total = len(next(iter(rows.values())))
        for start in range(0, total, size):
            lo, hi = start + index * per_host, start + (index + 1) * per_host
            batch = {k: np.zeros((per_host, self.cfg.seq_len), dtype=a.dtype) for k, a in rows.items()}
            for k, a in rows.items():
                part = a[lo:min(hi, total)]
                batch[k][:len(part)] = part
            yield batch

    def report(self) -> dict[str, Any]:
        """JSON-able summary for the run dir: settings, per-source counts, shares, expected epochs, the mixture."""
        epochs, shares = self.expected_epochs(), self.shares()
        sources = [asdict(s) | {"share": shares[s.name], "expected_epochs": epochs[s.name]} for s in self.summaries]
        basis = "steps" if self.steps is not None else "budget" if self.mixture.budget is not None else None
        return {"mode": self.cfg.mode, "unit": "examples" if self.cfg.mode == "sft" else "tokens",
                "seq_len": self.cfg.seq_len, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed,
                "process_count": self.train.process_count, "steps": self.steps, "epochs_from": basis,
                "sources": sources, "mixture": self.mixture.to_dict()}

    def format_report(self) -> str:
        """A fixed-width console table, one line per source (printing it is the caller's job)."""
        report = self.report()
        width = max(len("source"), *(len(s["name"]) for s in report["sources"]))
        head = (f"{'source':<{width}}  {'lang':<5} {'docs':>9} {'skipped':>8} {'eval':>6} {'tokens':>13} "
                f"{'rows':>9} {'share':>8} {'epochs':>7}")
        lines = [head]
        for s in report["sources"]:
            epochs = "-" if s["expected_epochs"] is None else f"{s['expected_epochs']:.2f}"
            lines.append(f"{s['name']:<{width}}  {s['language']:<5} {s['documents']:>9,} {s['skipped']:>8,} "
                         f"{s['eval_documents']:>6,} {s['tokens']:>13,} {s['rows']:>9,} "
                         f"{100 * s['share']:>7.2f}% {epochs:>7}")
        if self.steps is not None:
            basis = f"in {self.steps:,} steps of {self.cfg.batch_size} rows"
        elif self.mixture.budget is not None:
            basis = f"for a budget of {self.mixture.budget:,.0f} {report['unit']}"
        else:
            basis = "unknown (no steps or budget)"
        lines.append(f"mixture: {self.cfg.mixture.kind}; shares of rows drawn; epochs {basis}")
        if self.mixture.leftover:
            lines.append(f"leftover budget not drawn (every source at its epoch cap): "
                         f"{self.mixture.leftover:,.0f} {report['unit']}")
        return "\n".join(lines)


def build_data(cfg: DataConfig, tokenizer: Any, *, steps: int | None = None, process_index: int | None = None,
               process_count: int | None = None) -> Data:
    """Read, tokenize (cached) and pack or format every source, resolve the mixture, and build the iterator.

    `steps`, when known, gives the expected epochs per source in the report; host index and count default
    to JAX's.
    """
    index, count = process_shard(process_index, process_count)
    if cfg.batch_size % count:
        raise ClpError(f"data.batch_size {cfg.batch_size} must be a multiple of the {count} processes (hosts)")
    if cfg.mixture.kind == "explicit":  # weights name sources and are not all zero: check before reading data
        build_mixture(cfg.mixture, dict.fromkeys((s.name for s in cfg.sources), 1.0))
    eos_id = tokenizer.eos_token_id
    if cfg.mode == "pretrain" and eos_id is None:
        raise ClpError("the tokenizer has no EOS token, which packing puts between documents")
    pad_id = next((i for i in (tokenizer.pad_token_id, eos_id) if i is not None), 0)
    tables: dict[str, Rows] = {}
    eval_sets: dict[str, Rows] = {}
    summaries: list[SourceSummary] = []
    for src in cfg.sources:
        start = time.perf_counter()
        data = read_source(src)
        held = holdout_mask([_document_key(d) for d in data.documents], cfg.eval_documents)
        if held.all():
            raise ClpError(f"source '{src.name}' has {len(held)} documents; holding out eval_documents="
                           f"{cfg.eval_documents} leaves none for training (lower eval_documents)")
        make_rows = _sft_rows if cfg.mode == "sft" else _pretrain_rows
        train, held_out, tokens, eval_tokens, cached = make_rows(data, held, cfg, tokenizer,
                                                                 pad_id if cfg.mode == "sft" else eos_id)
        tables[src.name], eval_sets[src.name] = train, held_out
        stats = data.stats
        summaries.append(SourceSummary(
            name=src.name, language=data.language, documents=len(held),
            skipped=stats.skipped_undecodable + stats.skipped_empty + stats.skipped_language,
            eval_documents=int(held.sum()), tokens=tokens, eval_tokens=eval_tokens,
            rows=len(train["tokens"]), size=float(len(held) - held.sum() if cfg.mode == "sft" else tokens),
            from_cache=cached, seconds=round(time.perf_counter() - start, 3)))
    mixture = build_mixture(cfg.mixture, {s.name: s.size for s in summaries}, {s.name: s.language for s in summaries})
    unmixed = [s.name for s in summaries if s.name not in mixture.names]
    if unmixed:
        raise ClpError(f"sources {', '.join(unmixed)} are not in the mixture (it covers {', '.join(mixture.names)}); "
                       "remove them or give them a weight")
    train_iter = MixtureIterator(tables, mixture, cfg.batch_size, cfg.seed, index, count)
    return Data(cfg, train_iter, mixture, eval_sets, summaries, steps)
