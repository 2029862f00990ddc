"""`clp-jax demo`: CLP-Transfer of a real English-first model to another language, end to end, on a CPU.

1. The target-language text is split: the last ``held_out_docs`` lines are held out, the rest is training text.
2. A byte-level BPE tokenizer and a small GPT-2 helper are trained here on the training text.
3. `study transfer` at step 0: the source transferred with every strategy, held-out loss and bits per byte, the
   source (with its own tokenizer) and the helper as reference lines.
4. Continued pretraining of the best step-0 strategy and the ``compare`` baselines: the same steps and data
   order, held-out loss from step 0 every ``train.eval_every`` steps (study transfer's curves).
5. A short multilingual SFT round (English + target-language math word problems) on the best trained model.
6. report.md, demo.json and the plots (clp_jax.demo_report).

Layout of ``out``: data/ (the split), tokenizer/, helper/ (init/, run/ with the exported helper in
run/hf/final), study/ (`study transfer`'s dir), sft/ (data/ and run/), xla_cache/. Each stage stores the config
it was made from beside its result (tokenizer.json, helper.json, sft.json; the study per part) and is reused
while that config is unchanged, else redone with the changed keys named.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import pydantic

from clp_jax import models
from clp_jax.compile_cache import use_compilation_cache
from clp_jax.config import ConfigModel, config_to_dict, save_config
from clp_jax.data.pipeline import DataConfig
from clp_jax.data.sources import SourceConfig
from clp_jax.errors import ClpError
from clp_jax.fetch import fetch
from clp_jax.files import read_lines, write_json
from clp_jax.hf.reader import dropout_rates, read_config
from clp_jax.hf.writer import hf_config_dict, save_pretrained
from clp_jax.models.config import TransformerConfig
from clp_jax.posttrain.tasks import math_problems, write_jsonl
from clp_jax.sharding import MeshConfig, make_mesh, tree_shardings
from clp_jax.train.config import EvalSection, ModelSection, TrainConfig
from clp_jax.train.loop import Trainer
from clp_jax.train.optimizer import OptimizerConfig
from clp_jax.train.run_log import read_metrics
from clp_jax.transfer.study import (
    DEFAULT_STRATEGIES,
    StudyEval,
    StudyTrain,
    TransferStudyConfig,
    claim_run_dir,
    part_key,
    reuse_or_make,
    run_study,
    split_held_out,
    texts_hash,
)
from clp_jax.transfer.validate import DEFAULT_STRATEGY

SOURCE_MODEL = "smollm2-135m"


class DemoHelper(ConfigModel):
    """The target tokenizer's size and the small GPT-2 helper pretrained here on the training text."""

    vocab_size: int = pydantic.Field(16384, ge=260)
    layers: int = pydantic.Field(2, ge=1)
    width: int = pydantic.Field(128, ge=8)
    heads: int = pydantic.Field(2, ge=1)
    steps: int = pydantic.Field(150, ge=1)
    batch_size: int = pydantic.Field(16, ge=1)
    seq_len: int = pydantic.Field(128, ge=2)
    learning_rate: float = pydantic.Field(3e-3, gt=0)
    seed: int = 0


class DemoSft(ConfigModel):
    """The SFT round: English + target-language math word problems, loss on responses only."""

    steps: int = pydantic.Field(8, ge=1)
    english: int = pydantic.Field(200, ge=1)  # training examples
    target: int = pydantic.Field(50, ge=1)
    eval_examples: int = pydantic.Field(16, ge=1)  # held out per language
    batch_size: int = pydantic.Field(8, ge=1)
    seq_len: int = pydantic.Field(96, ge=2)
    learning_rate: float = pydantic.Field(1e-4, gt=0)


class DemoEval(StudyEval):
    """Held-out evaluation (study transfer's), sized for a CPU."""

    seq_len: int | None = pydantic.Field(128, ge=2)


class DemoTrain(StudyTrain):
    """Continued pretraining of the compared strategies (study transfer's), sized for a CPU."""

    steps: int = pydantic.Field(20, ge=1)
    eval_every: int = pydantic.Field(5, ge=1)
    seq_len: int = pydantic.Field(64, ge=2)
    batch_size: int = pydantic.Field(8, ge=1)
    learning_rate: float = pydantic.Field(3e-4, gt=0)


class DemoConfig(ConfigModel):
    """The demo's inputs (a source HF dir, a target-language text file) and the size of every stage."""

    source: str | None = None  # HF dir; None: fetch smollm2-135m (resolve_inputs)
    text: str | None = None  # one document per line; None: fetch wiki-<language>
    source_name: str | None = None  # in the report; None: the fetched name or the dir's name
    language: str = "fr"
    out: str = "demo_out"
    held_out_docs: int = pydantic.Field(64, ge=1)
    eval: DemoEval = DemoEval()
    strategies: list[str] = pydantic.Field(default_factory=lambda: list(DEFAULT_STRATEGIES), min_length=1)
    # trained too, beside the best at step 0
    compare: list[str] = pydantic.Field(default_factory=lambda: [DEFAULT_STRATEGY, "clp", "from-scratch", "mean"])
    helper: DemoHelper = DemoHelper()
    train: DemoTrain = DemoTrain()
    sft: DemoSft = DemoSft()


QUICK = ["held_out_docs=16", "eval.seq_len=64", "strategies=[clp, mean, from-scratch]", "compare=[from-scratch]",
         "helper.vocab_size=4096", "helper.width=64", "helper.steps=20", "train.steps=2", "train.eval_every=1",
         "train.seq_len=32", "sft.steps=2", "sft.english=16", "sft.target=8", "sft.eval_examples=4", "sft.seq_len=64"]
"""Overrides of `--quick`: a smoke test of every stage in a couple of minutes."""


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def resolve_inputs(cfg: DemoConfig, cache_dir: str | None = None) -> DemoConfig:
    """``cfg`` with its source dir and text file set: those not given are fetched into the cache (SmolLM2-135M,
    the Wikipedia summaries of ``cfg.language``) unless cached there."""
    update: dict[str, Any] = {"source_name": cfg.source_name or (
        os.path.basename(os.path.normpath(cfg.source)) if cfg.source else SOURCE_MODEL)}
    if cfg.source is None:
        update["source"] = fetch(SOURCE_MODEL, cache_dir)
    if cfg.text is None:
        update["text"] = fetch(f"wiki-{cfg.language}", cache_dir)
    return cfg.model_copy(update=update)


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A GPT-2 style byte-level BPE tokenizer trained on ``texts`` (no chat template: SFT uses plain prompts)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)


def small_gpt2(vocab_size: int, layers: int, width: int, heads: int, positions: int) -> TransformerConfig:
    """A GPT-2 architecture of the given size (the helper)."""
    if width % heads:
        raise ClpError(f"helper.width={width} is not a multiple of helper.heads={heads}")
    return TransformerConfig(arch="gpt2", vocab_size=vocab_size, hidden_size=width, num_layers=layers,
                             num_heads=heads, num_kv_heads=heads, head_dim=width // heads,
                             intermediate_size=4 * width, norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
                             gated_mlp=False, position="learned", max_position_embeddings=positions,
                             qkv_bias=True, out_bias=True, mlp_bias=True)


def write_random_model(path: str, cfg: TransformerConfig, tokenizer: Any, seed: int) -> None:
    """A randomly initialized model as an HF dir with ``tokenizer`` (where the helper's pretraining starts); its
    config.json sets no dropout, as clp-jax trains without."""
    mesh = make_mesh(data=-1)
    shardings = tree_shardings(models.param_axes(cfg), models.param_shapes(cfg), mesh)
    params = jax.jit(lambda k: models.init_params(cfg, k), out_shardings=shardings)(jax.random.key(seed))
    base = hf_config_dict(cfg, tokenizer=tokenizer)
    base.update(dict.fromkeys(dropout_rates(base), 0.0))
    save_pretrained(path, params, cfg, base_config=base, tokenizer=tokenizer, overwrite=True)


class _Stages:
    """Wall seconds per stage, announced as each starts: measured when a stage is made, kept in timings.json from
    the run that made it when it is reused."""

    def __init__(self, path: str) -> None:
        self.path, self.start = path, time.perf_counter()
        try:
            with open(path, encoding="utf-8") as f:
                self.made: dict[str, float] = json.load(f)
        except (OSError, ValueError):
            self.made = {}
        self.seconds: dict[str, float] = {}
        self.reused: dict[str, bool] = {}

    def run(self, key: str, label: str, fn: Callable[[], tuple[Any, bool]]) -> Any:
        """``fn()``'s result; ``fn`` returns (result, whether it was reused)."""
        _say(f"{label} (at {(time.perf_counter() - self.start) / 60:.1f} min)")
        t = time.perf_counter()
        result, reused = fn()
        took = round(time.perf_counter() - t, 1)
        _say(f"{label}: {took:.0f} s")
        self.reused[key] = reused
        self.seconds[key] = self.made[key] if reused and key in self.made else took
        self.made[key] = self.seconds[key]
        write_json(self.path, self.made)
        return result

    def minutes(self) -> float:
        """This run's wall minutes so far."""
        return (time.perf_counter() - self.start) / 60


def _split(cfg: DemoConfig) -> dict[str, Any]:
    """Write data/train.txt and data/held_out.txt (study transfer's rule: the last ``held_out_docs`` lines)."""
    train, held = split_held_out(read_lines(cfg.text), None, cfg.held_out_docs, cfg.text)
    paths = {"train": os.path.join(cfg.out, "data", "train.txt"), "held_out": os.path.join(cfg.out, "data",
                                                                                           "held_out.txt")}
    for texts, path in ((train, paths["train"]), (held, paths["held_out"])):
        if not os.path.isfile(path) or read_lines(path) != texts:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(t + "\n" for t in texts))
    _say(f"{len(train)} training documents, {len(held)} held out (the last lines of {cfg.text})")
    return {**paths, "train_texts": train, "train_key": texts_hash(train), "documents": [len(train), len(held)]}


def _tokenizer(cfg: DemoConfig, split: dict) -> tuple[tuple[str, dict], bool]:
    """(the target tokenizer dir, its config), trained on the training text unless the text and size are
    unchanged; and whether it was reused."""
    path = os.path.join(cfg.out, "tokenizer")
    conf = {"train": split["train_key"], "vocab_size": cfg.helper.vocab_size}

    def make() -> dict:
        tok = train_tokenizer(split["train_texts"], cfg.helper.vocab_size)
        shutil.rmtree(path, ignore_errors=True)
        tok.save_pretrained(path)
        return {"vocab_size": len(tok)}

    result, reused = reuse_or_make(os.path.join(cfg.out, "tokenizer.json"), "tokenizer", conf, make,
                                   artifact=os.path.join(path, "tokenizer.json"), say=_say)
    return (path, {**conf, **result}), reused


def _helper(cfg: DemoConfig, split: dict, tokenizer_dir: str,
            tokenizer_conf: dict) -> tuple[tuple[str, dict], bool]:
    """(the exported HF dir of the helper GPT-2 pretrained on the training text, its summary); whether it was
    reused."""
    from clp_jax.hf.tokenizer import load_tokenizer

    h, d = cfg.helper, os.path.join(cfg.out, "helper")
    final = os.path.join(d, "run", "hf", "final")
    conf = {"tokenizer": part_key(tokenizer_conf), "train": split["train_key"], "eval_seq_len": cfg.eval.seq_len,
            **config_to_dict(h)}

    def make() -> dict:
        tok = load_tokenizer(tokenizer_dir)
        model_cfg = small_gpt2(len(tok), h.layers, h.width, h.heads, max(h.seq_len, cfg.eval.seq_len or 0))
        write_random_model(os.path.join(d, "init"), model_cfg, tok, h.seed)
        run_dir = os.path.join(d, "run")
        claim_run_dir(run_dir, part_key(conf))
        data = DataConfig(sources=[SourceConfig(name=cfg.language, path=os.path.abspath(split["train"]),
                                                format="text", language=cfg.language)],
                          seq_len=h.seq_len, batch_size=h.batch_size, seed=h.seed, eval_documents=0,
                          cache_dir=os.path.join(cfg.out, "token_cache"))
        opt = OptimizerConfig(learning_rate=h.learning_rate, warmup_steps=max(1, h.steps // 20), total_steps=h.steps,
                              weight_decay=0.01)
        tcfg = TrainConfig(run_dir=run_dir, model=ModelSection(init=os.path.join(d, "init")), data=data,
                           optimizer=opt, steps=h.steps, mesh=MeshConfig(data=-1),
                           eval=EvalSection(every_steps=h.steps), checkpoint={"every_steps": h.steps, "keep": 1},
                           log_every_steps=max(1, h.steps // 10), tensorboard=False)
        summary = Trainer(tcfg).run()
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        return {"params": model_cfg.num_params(), "steps": summary["step"], "train_loss": summary.get("loss"),
                "layers": h.layers, "width": h.width}

    result, reused = reuse_or_make(os.path.join(d, "helper.json"), "helper pretraining", conf, make,
                                   artifact=os.path.join(final, "config.json"), say=_say)
    return (final, result), reused


def _study_config(cfg: DemoConfig, helper_dir: str, split: dict, strategies: list[str],
                  train: StudyTrain) -> TransferStudyConfig:
    return TransferStudyConfig(source=cfg.source, helper=helper_dir, data=split["train"], held_out=split["held_out"],
                               language=cfg.language, out=os.path.join(cfg.out, "study"), strategies=strategies,
                               eval=StudyEval(**config_to_dict(cfg.eval)), train=train)


def _read_results(study_dir: str) -> dict:
    with open(os.path.join(study_dir, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def _sft(cfg: DemoConfig, model_dir: str, model_key: str) -> tuple[dict, bool]:
    """English + target-language math SFT of ``model_dir``: held-out response loss and bpb per language, before
    and after; and whether it was reused."""
    s, d = cfg.sft, os.path.join(cfg.out, "sft")
    conf = {"model": model_key, **config_to_dict(s), "language": cfg.language}

    def make() -> dict:
        sources = []
        for lang, n, seed in (("en", s.english, 0), (cfg.language, s.target, 1)):
            path = os.path.join(d, "data", f"math-{lang}.jsonl")
            write_jsonl(math_problems(lang, n + s.eval_examples, seed=seed), path)
            sources.append(SourceConfig(name=f"math-{lang}", path=os.path.abspath(path), format="jsonl",
                                        task="math", language=lang))
        run_dir = os.path.join(d, "run")
        claim_run_dir(run_dir, part_key(conf))
        data = DataConfig(sources=sources, seq_len=s.seq_len, batch_size=s.batch_size, seed=0, mode="sft",
                          eval_documents=s.eval_examples)
        opt = OptimizerConfig(learning_rate=s.learning_rate, warmup_steps=max(1, s.steps // 10), total_steps=s.steps)
        tcfg = TrainConfig(run_dir=run_dir, model=ModelSection(init=model_dir), data=data, optimizer=opt,
                           steps=s.steps, mesh=MeshConfig(data=-1), eval=EvalSection(every_steps=s.steps,
                                                                                     at_start=True),
                           checkpoint={"every_steps": s.steps, "keep": 1}, log_every_steps=max(1, s.steps // 4),
                           export_final=False, tensorboard=False)
        summary = Trainer(tcfg).run()
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        evals = [r for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]
        return {"steps": summary["step"], "train_loss": summary.get("loss"), "model": model_dir,
                "languages": {lang: {when: {m: r.get(f"eval/math-{lang}/{m}") for m in ("loss", "bpb")}
                                     for when, r in (("before", evals[0]), ("after", evals[-1]))}
                              for lang in ("en", cfg.language)}}

    return reuse_or_make(os.path.join(d, "sft.json"), "SFT round", conf, make, say=_say)


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) every stage and write report.md, demo.json and the plots in ``cfg.out``; returns the
    summary the CLI prints."""
    from clp_jax.demo_report import write_report

    if cfg.source is None or cfg.text is None:
        raise ClpError("the demo needs a source model dir and a text file (resolve_inputs fetches them)")
    missing = [name for name in cfg.compare if name not in cfg.strategies]
    if missing:
        raise ClpError(f"compare: {', '.join(missing)} not among the strategies ({', '.join(cfg.strategies)})")
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.yaml"))
    use_compilation_cache(os.path.abspath(os.path.join(cfg.out, "xla_cache")))
    stages = _Stages(os.path.join(cfg.out, "timings.json"))
    split = stages.run("split", "split", lambda: (_split(cfg), False))
    tok_dir, tok_conf = stages.run("tokenizer", "tokenizer", lambda: _tokenizer(cfg, split))
    helper_dir, helper = stages.run("helper", "helper pretraining", lambda: _helper(cfg, split, tok_dir, tok_conf))
    study_dir = os.path.join(cfg.out, "study")
    if not stages.reused["helper"] and os.path.isdir(study_dir):
        _say("the helper changed: the study's parts made from the old one are removed")
        shutil.rmtree(study_dir)
    stages.run("step0", "step-0 study", lambda: _study(_study_config(cfg, helper_dir, split, cfg.strategies,
                                                                      StudyTrain(steps=0))))
    step0 = _read_results(study_dir)
    trained = list(dict.fromkeys([step0["ranking"][0], *cfg.compare]))
    train = StudyTrain(**{**config_to_dict(cfg.train), "export_final": True})
    stages.run("train", f"continued pretraining of {', '.join(trained)}",
               lambda: _study(_study_config(cfg, helper_dir, split, trained, train)))
    curves = _read_results(study_dir)
    best = curves["ranking"][0]
    best_dir = os.path.join(study_dir, "strategies", best)
    with open(os.path.join(best_dir, "train.json"), encoding="utf-8") as f:
        best_key = json.load(f)["key"]
    sft = stages.run("sft", f"SFT round on {best}", lambda: _sft(cfg, os.path.join(best_dir, "train", "hf", "final"),
                                                                 best_key))
    source = {"name": cfg.source_name, "params": read_config(cfg.source).num_params()}
    helper = {**helper, "vocab_size": tok_conf["vocab_size"], "train_documents": split["documents"][0]}
    return write_report(cfg, source, helper, step0, curves, sft, stages.seconds, stages.minutes())


def _study(cfg: TransferStudyConfig) -> tuple[dict, bool]:
    """`run_study`'s summary, and whether every part was reused."""
    summary = run_study(cfg)
    return summary, not any(summary["redone"].values())
