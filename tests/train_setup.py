"""A tiny model, tokenizer, two-language corpus and train config for the training tests."""

import os

import yaml
from conftest import WORDS_DE, WORDS_EN, make_sentences, train_byte_level_tokenizer
from hf_models import make_hf_model


def make_train_config(root, steps=12, **overrides):
    """Write model/, en.txt, de.txt and train.yaml under ``root``; return the config path."""
    root = str(root)
    model = os.path.join(root, "model")
    if not os.path.isdir(model):
        en, de = make_sentences(WORDS_EN, 200, seed=1), make_sentences(WORDS_DE, 200, seed=2)
        tok = train_byte_level_tokenizer(en + de, vocab_size=320)
        make_hf_model("gpt2", vocab_size=len(tok), n_positions=64).save_pretrained(model)
        tok.save_pretrained(model)
        for lang, texts in (("en", en), ("de", de)):
            with open(os.path.join(root, f"{lang}.txt"), "w") as f:
                f.write("\n".join(texts) + "\n")
    cfg = {
        "run_dir": os.path.join(root, "run"),
        "model": {"init": model},
        "data": {"sources": [{"name": lang, "path": os.path.join(root, f"{lang}.txt"), "language": lang}
                             for lang in ("en", "de")],
                 "seq_len": 32, "batch_size": 8, "eval_documents": 16, "seed": 3},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 2},
        "steps": steps, "eval": {"every_steps": 4, "max_batches": 2}, "checkpoint": {"every_steps": 4, "keep": 2},
        "log_every_steps": 2, "tensorboard": True,
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = os.path.join(root, f"train_{len(os.listdir(root))}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path
