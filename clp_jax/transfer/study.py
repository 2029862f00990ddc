"""`clp-jax study transfer`: one source + helper transferred with every strategy (and option variant), compared on
held-out loss and bits per byte at step 0 and, with ``train.steps`` > 0, along continued pretraining.

Layout of ``out``::

    config.yaml                       the resolved study config
    data/held_out.txt, data/train.txt  the split (train.txt only when training from the tail-held-out --data)
    references/source.json, helper.json   the source (own tokenizer) and the helper on the held-out text
    strategies/<name>/model/           the transferred HF dir; transfer.json: its summary and diagnostics
    strategies/<name>/step0.json       held-out eval of the transferred dir
    strategies/<name>/train/           the Trainer's run dir with curve.jsonl; train.json: the finished curve
    results.json, results.md, step0_bpb.png, bpb_curves.png

Each part's JSON holds the sha256 of the resolved config it was made from (and that config). A rerun reuses
a part whose hash matches and otherwise says which keys changed and redoes it; a part's config includes the
hashes of its inputs, so a changed transfer option redoes that strategy's eval and training, nothing else.
Models are keyed by path, not content: after changing a model in place, delete the parts that used it.

Every held-out number is `clp_jax.eval.perplexity`'s (what `clp-jax eval` computes: whole documents, the
tokenizer's defaults, truncated to ``eval.seq_len``); curve points apply the same function to the Trainer's
parameters, so a curve's step 0 is the step-0 eval up to the compute dtype. The held-out documents are
``held_out`` or else the last ``held_out_docs`` non-empty lines of ``data`` (the rest is training data).
Every strategy trains on the same rows in the same order (one tokenizer, one data seed, one optimizer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pydantic

from clp_jax.config import ConfigModel, config_to_dict, save_config
from clp_jax.data.pipeline import DataConfig
from clp_jax.data.sources import SourceConfig
from clp_jax.errors import ClpError, stopped_run_error
from clp_jax.eval.perplexity import encode_documents, evaluate_model_dir, perplexity
from clp_jax.files import atomic_open, read_lines, write_json
from clp_jax.hf.reader import read_config
from clp_jax.hf.tokenizer import load_tokenizer
from clp_jax.sharding import MeshConfig, mesh_from_config
from clp_jax.train.config import EvalSection, ModelSection, TrainConfig
from clp_jax.train.loop import Trainer
from clp_jax.train.optimizer import OptimizerConfig
from clp_jax.transfer.align import align_vocabularies
from clp_jax.transfer.embeddings import HELPER_STRATEGIES
from clp_jax.transfer.params import STRATEGIES
from clp_jax.transfer.run import Strategy, TransferConfig, input_embedding, run_transfer
from clp_jax.transfer.study_report import cell, mean_cosine_to_shared_mean, write_results

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # the default list's option variants: name -> (strategy, options)
    "clp+center": ("clp", {"center_helper": True}),
    "clp-topk+center": ("clp-topk", {"center_helper": True}),
    "omp+center": ("omp", {"center_helper": True}),
    "clp+match-norms": ("clp", {"match_norms": True}),
}
DEFAULT_STRATEGIES = (*STRATEGIES, *VARIANTS)
OPTION_KEYS = ("top_k", "temperature", "omp_k", "center_helper", "match_norms", "min_mean_cos", "max_norm_factor")


class StrategySpec(ConfigModel):
    """One row of the study: a name (also its dir), a strategy and the transfer options it sets."""

    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
    strategy: Strategy
    top_k: int | None = pydantic.Field(None, ge=1)
    temperature: float | None = pydantic.Field(None, gt=0)
    omp_k: int | None = pydantic.Field(None, ge=1)
    center_helper: bool | None = None
    match_norms: bool | None = None
    min_mean_cos: float | None = pydantic.Field(None, ge=0)
    max_norm_factor: float | None = pydantic.Field(None, gt=0)

    def options(self) -> dict[str, Any]:
        """The transfer options this entry sets (the rest keep `clp-jax transfer`'s defaults)."""
        return {k: getattr(self, k) for k in OPTION_KEYS if getattr(self, k) is not None}


class StudyEval(ConfigModel):
    """How every held-out number is computed (the `clp-jax eval` contract)."""

    seq_len: int | None = pydantic.Field(None, ge=2)  # None: min(1024, the source's max positions)
    batch_size: int = pydantic.Field(8, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"


class StudyTrain(ConfigModel):
    """Continued pretraining of every strategy: the same data, data order and optimizer for each."""

    steps: int = pydantic.Field(0, ge=0)  # 0: step-0 comparison only
    eval_every: int = pydantic.Field(50, ge=1)
    seq_len: int = pydantic.Field(256, ge=2)
    batch_size: int = pydantic.Field(16, ge=1)
    seed: int = pydantic.Field(0, ge=0)  # data order
    learning_rate: float = pydantic.Field(1e-4, gt=0)
    warmup_steps: int | None = pydantic.Field(None, ge=0)  # None: steps // 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = pydantic.Field(0.1, ge=0)
    max_grad_norm: float | None = pydantic.Field(1.0, ge=0)
    embeddings_only_steps: int = pydantic.Field(0, ge=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    keep_checkpoints: bool = False  # else a finished run's checkpoints are deleted (its curve is kept)
    export_final: bool = False  # the trained model as an HF dir in train/hf/final


class TransferStudyConfig(ConfigModel):
    """`clp-jax study transfer`: the models, the text, the strategies and how they are evaluated and trained."""

    source: str
    helper: str | None = None
    helper_tokenizer: str | None = None
    data: str
    held_out: str | None = None
    held_out_docs: int = pydantic.Field(300, ge=1)
    language: str = "und"  # label of the training source
    out: str = "transfer_study"
    strategies: list[str | StrategySpec] = pydantic.Field(default_factory=lambda: list(DEFAULT_STRATEGIES),
                                                          min_length=1)
    matching: Literal["auto", "exact", "canonical"] = "auto"
    seed: int = 0  # transfer (random rows, from-scratch)
    block_size: int = pydantic.Field(1024, ge=1)
    transfer_mesh: MeshConfig = MeshConfig(data=1, fsdp=-1)
    mesh: MeshConfig = MeshConfig()  # eval and training
    eval: StudyEval = StudyEval()
    train: StudyTrain = StudyTrain()


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def resolve_strategies(cfg: TransferStudyConfig) -> list[StrategySpec]:
    """The study's entries as specs: a plain name is a strategy or one of VARIANTS; names must be unique."""
    specs = []
    for entry in cfg.strategies:
        if isinstance(entry, StrategySpec):
            specs.append(entry)
        elif entry in STRATEGIES:
            specs.append(StrategySpec(name=entry, strategy=entry))
        elif entry in VARIANTS:
            strategy, options = VARIANTS[entry]
            specs.append(StrategySpec(name=entry, strategy=strategy, **options))
        else:
            raise ClpError(f"unknown strategy {entry!r}: use one of {', '.join(DEFAULT_STRATEGIES)}, or in YAML "
                           "{name: ..., strategy: ..., <option>: ...}")
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ClpError(f"strategy names must be unique; repeated: {', '.join(repeated)}")
    needs_helper = [s.name for s in specs if s.strategy in HELPER_STRATEGIES]
    if cfg.helper is None and needs_helper:
        raise ClpError(f"strategies {', '.join(needs_helper)} need --helper (a target-language model)")
    if cfg.helper is None and cfg.helper_tokenizer is None:
        raise ClpError("no target tokenizer: pass --helper DIR (or --helper-tokenizer DIR)")
    return specs


def split_held_out(lines: Sequence[str], held_out_lines: Sequence[str] | None, count: int,
                   data_name: str) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the held-out file's lines, or else the last ``count`` lines of the data."""
    if held_out_lines is not None:
        return list(lines), list(held_out_lines)
    if len(lines) <= count:
        raise ClpError(f"{data_name}: {len(lines)} non-empty lines; holding out the last held_out_docs={count} "
                       "leaves none for training (pass --held-out FILE or lower held_out_docs)")
    return list(lines[:-count]), list(lines[-count:])


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 of the texts, one per line (lines hold no newline)."""
    return hashlib.sha256("\n".join(texts).encode("utf-8", "surrogatepass")).hexdigest()


def part_key(config: dict) -> str:
    """sha256 of a part's resolved config, as canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new), key=str)
                for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def transfer_config(cfg: TransferStudyConfig, spec: StrategySpec, out: str) -> TransferConfig:
    """The `clp-jax transfer` run of one entry: the helper's embedding sets every strategy's target vocabulary."""
    helper = os.path.abspath(cfg.helper) if cfg.helper else None
    target_tok = os.path.abspath(cfg.helper_tokenizer) if cfg.helper_tokenizer else None
    return TransferConfig(source=os.path.abspath(cfg.source), helper=helper, helper_tokenizer=target_tok, out=out,
                          strategy=spec.strategy, matching=cfg.matching, seed=cfg.seed, block_size=cfg.block_size,
                          mesh=cfg.transfer_mesh, overwrite=True, **spec.options())


def train_config(cfg: TransferStudyConfig, model_dir: str, train_path: str, run_dir: str) -> TrainConfig:
    """The continued-pretraining run of one strategy; only ``model_dir`` and ``run_dir`` differ between them."""
    t = cfg.train
    data = DataConfig(sources=[SourceConfig(name="train", path=train_path, format="text", language=cfg.language)],
                      seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed, eval_documents=0,
                      cache_dir=os.path.join(cfg.out, "token_cache"))
    optimizer = OptimizerConfig(learning_rate=t.learning_rate, total_steps=t.steps, schedule=t.schedule,
                                warmup_steps=t.steps // 10 if t.warmup_steps is None else t.warmup_steps,
                                weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                                embeddings_only_steps=t.embeddings_only_steps)
    return TrainConfig(run_dir=run_dir, model=ModelSection(init=model_dir, dtype=t.dtype), data=data,
                       optimizer=optimizer, steps=t.steps, mesh=cfg.mesh, eval=EvalSection(every_steps=t.steps),
                       checkpoint={"every_steps": t.steps, "keep": 1}, log_every_steps=max(1, min(t.eval_every, 10)),
                       export_final=t.export_final, tensorboard=False)


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def reuse_or_make(path: str, label: str, config: dict, make: Callable[[], dict], artifact: str | None = None,
                  say: Callable[[str], None] = _say) -> tuple[dict, bool]:
    """The result stored at ``path`` when it was made from ``config`` (and ``artifact`` exists), else ``make()``'s,
    stored there; and whether it was reused."""
    key, old = part_key(config), _read_json(path)
    if old is not None and old.get("key") == key and (artifact is None or os.path.exists(artifact)):
        say(f"{label}: unchanged, reused")
        return old["result"], True
    if old is not None and old.get("key") != key:
        say(f"{label}: config changed ({', '.join(changed_keys(old.get('config'), config)) or 'format'}), redoing")
    result = make()
    write_json(path, {"key": key, "config": config, "result": result})
    return result, False


def _write_if_changed(path: str, texts: Sequence[str]) -> None:
    """The texts one per line, unless the file already holds exactly them (its mtime then stays)."""
    text = "".join(t + "\n" for t in texts)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with atomic_open(path) as f:
        f.write(text)


@dataclasses.dataclass(frozen=True)
class _Study:
    """What every entry of a running study shares: the config, the split, the eval and the diagnostics."""

    cfg: TransferStudyConfig
    held: list[str]
    held_path: str
    train_path: str
    eval_conf: dict  # the held-out text's hash and the eval settings, in every eval's part config
    train_key: str  # the training text's hash
    seq_len: int
    evaluate: Callable[[str, int], dict]  # model dir, seq_len -> held-out result
    diagnose: Callable[[str], dict]  # transferred dir -> diagnostics


def run_study(cfg: TransferStudyConfig) -> dict:
    """Transfer, evaluate and (optionally) train every entry, reusing unchanged parts; writes the results in
    ``cfg.out`` and returns the summary `clp-jax study transfer` prints."""
    start = time.perf_counter()
    specs = resolve_strategies(cfg)
    source_cfg = read_config(cfg.source)
    positions = source_cfg.max_position_embeddings
    seq_len = cfg.eval.seq_len or min(1024, positions)
    for what, n in (("eval.seq_len", seq_len), ("train.seq_len", cfg.train.seq_len if cfg.train.steps else 0)):
        if source_cfg.position == "learned" and n > positions:
            raise ClpError(f"{cfg.source}: {what}={n} exceeds the model's {positions} learned positions")
    train_texts, held = split_held_out(read_lines(cfg.data), read_lines(cfg.held_out) if cfg.held_out else None,
                                       cfg.held_out_docs, cfg.data)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.yaml"))
    held_path = os.path.join(cfg.out, "data", "held_out.txt")
    _write_if_changed(held_path, held)
    train_path = os.path.abspath(cfg.data)
    if cfg.train.steps and cfg.held_out is None:
        train_path = os.path.abspath(os.path.join(cfg.out, "data", "train.txt"))
        _write_if_changed(train_path, train_texts)
    where = cfg.held_out or f"the last {len(held)} lines of {cfg.data}"
    _say(f"{len(specs)} strategies; held out: {len(held)} documents ({where}), {len(train_texts)} for training; "
         f"eval seq_len {seq_len}, {cfg.train.steps} training steps each")
    mesh = mesh_from_config(cfg.mesh)

    def evaluate(model_dir: str, length: int) -> dict:
        r = evaluate_model_dir(model_dir, held, mesh, seq_len=length, batch_size=cfg.eval.batch_size,
                               dtype=cfg.eval.dtype, data_name=held_path)
        return {**r.to_dict(), "bpb": r.bits_per_byte, "seq_len": length}

    run = _Study(cfg, held, held_path, train_path, {"held_out": texts_hash(held), **config_to_dict(cfg.eval),
                                                    "seq_len": seq_len},
                 texts_hash(train_texts), seq_len, evaluate, _diagnostics(cfg))
    references = _references(run)
    rows = [_strategy(run, spec, f"[{i}/{len(specs)}] {spec.name}") for i, spec in enumerate(specs, 1)]
    redone = {part: sum(r["reused"][part] is False for r in rows) for part in ("transfer", "step0", "train")}
    results = write_results(cfg.out, rows, references, steps=cfg.train.steps,
                            title=f"Transfer study: {cfg.source} -> {cfg.helper or cfg.helper_tokenizer}",
                            held_out={"documents": len(held), "path": held_path, "seq_len": seq_len, "from": where,
                                      "sha256": run.eval_conf["held_out"]})
    return {"out": cfg.out, "strategies": len(rows), "ranking": results["ranking"], "best": results["ranking"][0],
            "steps": cfg.train.steps, "redone": redone, "results": os.path.join(cfg.out, "results.json"),
            "plots": results["plots"], "seconds": round(time.perf_counter() - start, 1)}


def _references(run: _Study) -> dict[str, dict]:
    """The reference lines: the source with its own tokenizer, and the helper (learned positions permitting)."""
    references = {}
    for label, model_dir in (("source", run.cfg.source), ("helper", run.cfg.helper)):
        if model_dir is None:
            continue
        ref_cfg = read_config(model_dir)
        length = min(run.seq_len, ref_cfg.max_position_embeddings) if ref_cfg.position == "learned" else run.seq_len
        conf = {"model": os.path.abspath(model_dir), **run.eval_conf, "seq_len": length}
        path = os.path.join(run.cfg.out, "references", f"{label}.json")
        references[label], _ = reuse_or_make(path, f"reference {label}", conf,
                                             lambda d=model_dir, n=length: run.evaluate(d, n))
        _say(f"reference {label}: loss {references[label]['loss']:.4f}, bpb {references[label]['bpb']:.4f}")
    return references


def _strategy(run: _Study, spec: StrategySpec, label: str) -> dict:
    """One entry's row: its transfer, step-0 eval and (with training steps) curve, each reused when unchanged."""
    cfg, d = run.cfg, os.path.join(run.cfg.out, "strategies", spec.name)
    model_dir = os.path.join(d, "model")
    tcfg = transfer_config(cfg, spec, model_dir)
    t_conf = {k: v for k, v in config_to_dict(tcfg).items() if k not in ("out", "overwrite", "mesh")}

    def make_transfer() -> dict:
        _say(f"{label}: transferring ({tcfg.strategy})")
        return {**run_transfer(tcfg), **run.diagnose(model_dir)}

    transfer, t_reused = reuse_or_make(os.path.join(d, "transfer.json"), f"{label} transfer", t_conf, make_transfer,
                                       artifact=os.path.join(model_dir, "config.json"))
    s_conf = {"transfer": part_key(t_conf), **run.eval_conf}
    step0, s_reused = reuse_or_make(os.path.join(d, "step0.json"), f"{label} step-0 eval", s_conf,
                                    lambda: run.evaluate(model_dir, run.seq_len))
    _say(f"{label}: step 0 loss {step0['loss']:.4f}, bpb {step0['bpb']:.4f}, mean cos to the shared mean "
         f"{cell(transfer['mean_cos_to_shared_mean'], 3)}, {transfer['degenerate_rows']} ill-conditioned rows")
    row = {"name": spec.name, "strategy": spec.strategy, "options": spec.options(), "transfer": transfer,
           "step0": step0, "curve": None, "reused": {"transfer": t_reused, "step0": s_reused, "train": None}}
    if cfg.train.steps:
        tr_conf = {"transfer": part_key(t_conf), "train_data": run.train_key, **run.eval_conf,
                   "train": {k: v for k, v in config_to_dict(cfg.train).items() if k != "keep_checkpoints"}}
        trained, row["reused"]["train"] = reuse_or_make(
            os.path.join(d, "train.json"), f"{label} training", tr_conf,
            lambda: _train(run, model_dir, os.path.join(d, "train"), part_key(tr_conf), label))
        row["curve"], row["train"] = trained["curve"], {k: v for k, v in trained.items() if k != "curve"}
    return row


def _diagnostics(cfg: TransferStudyConfig) -> Callable[[str], dict]:
    """model dir -> the transfer report's ill-conditioned counts and the mean cosine to the shared mean."""
    cache: dict[str, Any] = {}

    def diagnose(model_dir: str) -> dict:
        if not cache:
            source_tok = load_tokenizer(cfg.source)
            cache["alignment"] = align_vocabularies(source_tok, load_tokenizer(model_dir), cfg.matching)
            cache["source"] = input_embedding(cfg.source)
        a = cache["alignment"]
        report = _read_json(os.path.join(model_dir, "transfer_report.json")) or {}
        return {"mean_cos_to_shared_mean": mean_cosine_to_shared_mean(input_embedding(model_dir), cache["source"],
                                                                      a.target_ids, a.source_ids),
                "degenerate_rows": report.get("degenerate_rows", 0),
                "ill_conditioned": (report.get("ill_conditioned") or {}).get("counts")}

    return diagnose


def claim_run_dir(run_dir: str, key: str) -> None:
    """Make ``run_dir`` the Trainer dir of the part ``key``: a dir left by another config is removed first, so a
    run only ever resumes its own checkpoints."""
    marker = os.path.join(run_dir, "study_key.json")
    if os.path.isdir(run_dir) and (_read_json(marker) or {}).get("key") != key:
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    write_json(marker, {"key": key})


def _train(run: _Study, model_dir: str, run_dir: str, key: str, label: str) -> dict:
    """Continue pretraining one strategy; held-out loss/bpb at step 0 and every ``eval_every`` steps (curve.jsonl)."""
    claim_run_dir(run_dir, key)
    cfg, t, seq_len = run.cfg, run.cfg.train, run.seq_len
    trainer = Trainer(train_config(cfg, os.path.abspath(model_dir), run.train_path, run_dir))
    docs, covered, skipped = encode_documents(trainer.tokenizer, run.held, seq_len)
    curve_path = os.path.join(run_dir, "curve.jsonl")

    def point(step: int) -> None:
        if step % t.eval_every and step != t.steps:
            return
        r = perplexity(trainer.state.params, trainer.model_cfg, trainer.mesh, docs, batch_size=cfg.eval.batch_size,
                       seq_len=seq_len, skipped=skipped, covered_bytes=covered, progress=False)
        with open(curve_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "loss": r.loss, "bpb": r.bits_per_byte}) + "\n")
        _say(f"{label}: step {step} held-out loss {r.loss:.4f}, bpb {r.bits_per_byte:.4f}")

    if trainer.step == 0:
        point(0)
    else:
        _say(f"{label}: resuming at step {trainer.step}")
    summary = trainer.run(on_step=point)
    if summary["status"] != "finished":
        raise stopped_run_error(run_dir, summary)
    with open(curve_path, encoding="utf-8") as f:
        points = {p["step"]: p for p in map(json.loads, filter(str.strip, f))}  # a resumed run's repeats: last wins
    if not t.keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return {"curve": [points[s] for s in sorted(points)], "train_loss": summary.get("loss"), "steps": summary["step"]}


