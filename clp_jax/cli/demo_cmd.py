"""`clp-jax demo`: the whole CLP pipeline on real multilingual text, in minutes on a CPU.

1. Train byte-level BPE tokenizers for a source language (English) and a target language (Italian by default).
2. Pretrain a small source GPT-2 on the source language and a smaller helper GPT-2 on the target language.
3. `transfer` with clp and the baselines (from-scratch, random, overlap).
4. Continue pretraining each on the target language for the same steps; held-out loss every few steps.
5. report.md with plots: eval-loss curves, and the fraction of from-scratch's steps each needs to reach
   from-scratch's final loss (the paper's headline metric).
6. A small multilingual SFT round (dialogue, English budget + N target-language pairs) on the CLP model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax

from clp_jax import models
from clp_jax.cli.common import print_result
from clp_jax.data.demo_corpus import demo_texts
from clp_jax.data.demo_files import write_demo_corpus
from clp_jax.data.pipeline import DataConfig
from clp_jax.errors import ClpError
from clp_jax.eval.report import plot_eval_curves, plot_steps_fraction, steps_fraction
from clp_jax.files import atomic_open, write_json
from clp_jax.hf.writer import save_pretrained
from clp_jax.models.config import TransformerConfig
from clp_jax.posttrain.tasks import dialogue_pairs, write_jsonl
from clp_jax.sharding import MeshConfig, make_mesh, tree_shardings
from clp_jax.train.config import EvalSection, ModelSection, TrainConfig
from clp_jax.train.loop import Trainer
from clp_jax.train.metrics import read_metrics
from clp_jax.train.optimizer import OptimizerConfig
from clp_jax.transfer.run import TransferConfig, run_transfer

STRATEGIES = ("clp", "from-scratch", "random", "overlap")


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A GPT-2 style byte-level BPE tokenizer trained on ``texts``."""
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


def small_gpt2(vocab_size: int, layers: int, width: int, heads: int, positions: int = 128) -> TransformerConfig:
    return TransformerConfig(arch="gpt2", vocab_size=vocab_size, hidden_size=width, num_layers=layers,
                             num_heads=heads, num_kv_heads=heads, head_dim=width // heads,
                             intermediate_size=4 * width, norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
                             gated_mlp=False, position="learned", max_position_embeddings=positions,
                             qkv_bias=True, out_bias=True, mlp_bias=True)


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", parents=parents, help="run the whole CLP pipeline on the embedded demo corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output dir (default demo_out); reused runs resume")
    p.add_argument("--source-language", default="en")
    p.add_argument("--target-language", default="it")
    p.add_argument("--steps", type=int, default=200, help="continued-pretraining steps per initialization")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"initializations to compare (default {','.join(STRATEGIES)}; from-scratch is required)")
    p.add_argument("--quick", action="store_true", help="tiny step counts (a smoke test of the pipeline)")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _new_model(path: str, cfg: TransformerConfig, tokenizer: Any, seed: int) -> None:
    """A randomly initialized model written as an HF dir (the start of the source and helper pretraining)."""
    mesh = make_mesh(data=-1)
    shardings = tree_shardings(models.param_axes(cfg), models.param_shapes(cfg), mesh)
    params = jax.jit(lambda k: models.init_params(cfg, k), out_shardings=shardings)(jax.random.key(seed))
    save_pretrained(path, params, cfg, tokenizer=tokenizer, overwrite=True)


def _train(run_dir: str, init: str, sources: list[dict], steps: int, lr: float, eval_every: int,
           mode: str = "pretrain", batch: int = 16, seq_len: int = 64) -> dict:
    data = DataConfig(sources=sources, seq_len=seq_len, batch_size=batch, seed=0, mode=mode,
                      eval_documents=48 if mode == "pretrain" else 16)
    cfg = TrainConfig(run_dir=run_dir, model=ModelSection(init=init), data=data,
                      optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=max(1, steps // 20), total_steps=steps,
                                                weight_decay=0.01),
                      steps=steps, mesh=MeshConfig(data=-1), eval=EvalSection(every_steps=eval_every),
                      checkpoint={"every_steps": max(steps // 2, 1), "keep": 1}, log_every_steps=eval_every,
                      tensorboard=False)
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            done = json.load(f)
        if done.get("status") == "finished" and done.get("step") == steps:
            return done
    return Trainer(cfg).run()


def _curve(run_dir: str, source: str) -> list[tuple[int, float]]:
    key = f"eval/{source}/loss"
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out, src, tgt = args.out, args.source_language, args.target_language
    steps = 6 if args.quick else args.steps
    pre_steps = 6 if args.quick else 300
    eval_every = 2 if args.quick else max(steps // 20, 1)
    os.makedirs(out, exist_ok=True)
    corpus = write_demo_corpus(os.path.join(out, "corpus"), [src, tgt])
    _say(f"demo corpus (chatterbot-corpus, BSD-3): {len(demo_texts(src))} {src} and {len(demo_texts(tgt))} {tgt} "
         "utterances")
    source_tok = train_tokenizer(demo_texts(src), 1024)
    target_tok = train_tokenizer(demo_texts(tgt), 1024)
    _say(f"tokenizers: {src} {len(source_tok)} tokens, {tgt} {len(target_tok)} tokens")

    src_source = [{"name": src, "path": corpus[src], "language": src}]
    tgt_source = [{"name": tgt, "path": corpus[tgt], "language": tgt}]
    source_dir, helper_dir = os.path.join(out, "models", "source-init"), os.path.join(out, "models", "helper-init")
    source_cfg = small_gpt2(len(source_tok), layers=4, width=128, heads=4)
    helper_cfg = small_gpt2(len(target_tok), layers=2, width=64, heads=2)
    if not os.path.isdir(source_dir):
        _new_model(source_dir, source_cfg, source_tok, seed=1)
        _new_model(helper_dir, helper_cfg, target_tok, seed=2)
    _say(f"pretraining the {src} source model ({source_cfg.num_params():,} parameters, {pre_steps} steps)")
    _train(os.path.join(out, "runs", "source"), source_dir, src_source, pre_steps, 3e-3, pre_steps)
    _say(f"pretraining the small {tgt} helper model ({helper_cfg.num_params():,} parameters)")
    _train(os.path.join(out, "runs", "helper"), helper_dir, tgt_source, pre_steps, 3e-3, pre_steps)
    source_model = os.path.join(out, "runs", "source", "hf", "final")
    helper_model = os.path.join(out, "runs", "helper", "hf", "final")

    strategies = [x for x in args.strategies.split(",") if x]
    if "from-scratch" not in strategies:
        raise ClpError("--strategies must include from-scratch (the baseline of the headline metric)")
    curves, transfers = {}, {}
    for strategy in strategies:
        target_dir = os.path.join(out, "models", f"{tgt}-{strategy}")
        if not os.path.isdir(target_dir):
            _say(f"clp-jax transfer --strategy {strategy}")
            transfers[strategy] = run_transfer(TransferConfig(source=source_model, helper=helper_model,
                                                              out=target_dir, strategy=strategy))
        _say(f"continued pretraining on {tgt} from the {strategy} initialization ({steps} steps)")
        run_dir = os.path.join(out, "runs", f"{tgt}-{strategy}")
        _train(run_dir, target_dir, tgt_source, steps, 1e-3, eval_every)
        curves[strategy] = _curve(run_dir, tgt)
    fractions = steps_fraction(curves)
    plot_eval_curves(curves, os.path.join(out, "eval_loss.png"),
                     f"{src} -> {tgt}: held-out {tgt} loss during continued pretraining")
    plot_steps_fraction(fractions, os.path.join(out, "steps_to_from_scratch_loss.png"))

    _say("multilingual SFT round on the CLP model: dialogue pairs, English budget + N target-language pairs")
    sft = _sft_round(out, os.path.join(out, "runs", f"{tgt}-clp", "hf", "final"), src, tgt, 6 if args.quick else 100)
    report = _write_report(out, src, tgt, steps, curves, fractions, sft, time.perf_counter() - start)
    print_result(report)
    return 0


def _sft_round(out: str, model_dir: str, src: str, tgt: str, steps: int) -> dict:
    data_dir = os.path.join(out, "sft_data")
    sources = []
    for lang, n in ((src, 300), (tgt, 100)):
        pairs = dialogue_pairs(lang, seed=0)
        path = os.path.join(data_dir, f"dialogue-{lang}.jsonl")
        write_jsonl(pairs[:n], path)
        sources.append({"name": f"dialogue-{lang}", "path": path, "format": "jsonl", "task": "dialogue",
                        "language": lang})
    summary = _train(os.path.join(out, "runs", "sft"), model_dir, sources, steps, 1e-3, max(steps // 5, 1), mode="sft")
    return {k: v for k, v in summary.items() if k.startswith("eval/") and k.endswith("/loss")} | {
        "steps": steps, "train_loss": summary.get("loss")}


def _write_report(out: str, src: str, tgt: str, steps: int, curves: dict, fractions: dict, sft: dict,
                  seconds: float) -> dict:
    final = {k: c[-1][1] for k, c in curves.items()}
    lines = [f"# clp-jax demo: {src} -> {tgt}", "",
             f"A {src} GPT-2 (4 layers, d=128) and a small {tgt} helper (2 layers, d=64), both pretrained here on the "
             f"chatterbot-corpus demo text, were turned into {tgt} models by `clp-jax transfer` with each "
             f"initialization, then trained on {tgt} for {steps} steps each (same data order, same optimizer).",
             "", "| initialization | final held-out loss | steps to reach from-scratch's final loss |",
             "| --- | --- | --- |"]
    base = curves["from-scratch"][-1][0]
    for name in curves:
        frac = fractions[name]
        reach = "not reached" if frac is None else f"{round(frac * base)} of {base} ({frac:.0%})"
        lines.append(f"| {name} | {final[name]:.4f} | {reach} |")
    lines += ["", "![eval loss](eval_loss.png)", "", "![steps](steps_to_from_scratch_loss.png)", "",
              "## Multilingual SFT round on the CLP model", "",
              f"Dialogue pairs: 300 {src} + 100 {tgt}, {sft['steps']} steps; held-out response loss per language:", ""]
    lines += [f"- {k.split('/')[1]}: {v:.4f}" for k, v in sft.items() if k.startswith("eval/")]
    lines += ["", f"Total time: {seconds / 60:.1f} min."]
    with atomic_open(os.path.join(out, "report.md")) as f:
        f.write("\n".join(lines) + "\n")
    result = {"final_loss": final, "steps_fraction": fractions, "sft": sft, "minutes": round(seconds / 60, 2),
              "report": os.path.join(out, "report.md")}
    write_json(os.path.join(out, "demo.json"), result)
    return result
