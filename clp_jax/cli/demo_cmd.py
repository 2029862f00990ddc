"""`clp-jax demo`: the main job on an embedded default, end to end on real text, in minutes on a CPU.

Today: train a byte-level BPE tokenizer on the English demo corpus, initialize a small GPT-2,
export it as a Hugging Face dir, re-import it and evaluate its perplexity on held-out text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from clp_jax import models
from clp_jax.cli.common import print_result
from clp_jax.data.demo_corpus import demo_texts
from clp_jax.eval.perplexity import encode_documents, perplexity
from clp_jax.hf.reader import load_params, read_config
from clp_jax.hf.writer import save_pretrained
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import make_mesh, tree_shardings


def train_tokenizer(texts: list[str], vocab_size: int):
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


def small_gpt2(vocab_size: int) -> TransformerConfig:
    return TransformerConfig(arch="gpt2", vocab_size=vocab_size, hidden_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=4, head_dim=32, intermediate_size=512, norm="layernorm", norm_eps=1e-5,
                             activation="gelu_tanh", gated_mlp=False, position="learned", max_position_embeddings=256,
                             qkv_bias=True, out_bias=True, mlp_bias=True)


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", parents=parents, help="run the pipeline on the embedded demo corpus",
                       description="Run the pipeline on the embedded demo corpus (chatterbot-corpus, from PyPI): "
                                   "tokenizer, model, Hugging Face export, re-import and evaluation.")
    p.add_argument("--out", default="demo_out", help="output dir (default demo_out); replaced if it exists")
    p.set_defaults(func=run)


def _step(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    texts = demo_texts("en")
    held_out, train = texts[::10], [t for i, t in enumerate(texts) if i % 10]
    _step(f"English demo corpus: {len(train)} training and {len(held_out)} held-out utterances")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "held_out.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(held_out) + "\n")
    tokenizer = train_tokenizer(train, vocab_size=1024)
    _step(f"trained a byte-level BPE tokenizer with {len(tokenizer)} tokens")
    cfg = small_gpt2(len(tokenizer))
    mesh = make_mesh(data=-1)
    params = jax.jit(lambda k: models.init_params(cfg, k),
                     out_shardings=tree_shardings(models.param_axes(cfg), models.param_shapes(cfg), mesh))(
        jax.random.key(0))
    _step(f"initialized a GPT-2 with {cfg.num_params():,} parameters on a {dict(mesh.shape)} mesh")
    model_dir = os.path.join(args.out, "model")
    save_pretrained(model_dir, params, cfg, tokenizer=tokenizer, overwrite=True)
    _step(f"exported it as a Hugging Face dir: {model_dir}")
    cfg2, params2 = load_params(model_dir, mesh, read_config(model_dir))
    same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
    docs, skipped = encode_documents(tokenizer, held_out, 256)
    result = perplexity(params2, cfg2, mesh, docs, batch_size=16, seq_len=256, skipped=skipped).to_dict()
    result.update(reimport_identical=same, model_dir=model_dir, seconds=round(time.perf_counter() - start, 1))
    _step(f"held-out loss {result['loss']:.4f} nats (ppl {result['ppl']:.1f}; an untrained model is near "
          f"ln({len(tokenizer)}) = {__import__('math').log(len(tokenizer)):.2f})")
    with open(os.path.join(args.out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print_result(result)
    return 0
