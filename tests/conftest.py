"""Shared fixtures: 8 simulated devices, tiny tokenizers and tiny random HF models made in the test."""

import atexit
import os
import shutil
import tempfile

# 8 simulated devices; optimization level 0 roughly halves XLA:CPU compile time, which dominates these tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# One compilation cache for the session, shared with the xdist workers and the subprocesses that tests start;
# removed when the process that made it exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="clp-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (installed for the plan test) would make every JAX process probe for a TPU first; plan compiles for
# TPU topologies without one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random  # noqa: E402

import pytest  # noqa: E402

WORDS_EN = ("the house is small and the garden is green we walk to the river every morning "
            "a child reads a book while the old man sleeps near the window light rain falls today").split()
WORDS_DE = ("das haus ist klein und der garten ist grün wir gehen jeden morgen zum fluss ein kind liest "
            "ein buch während der alte mann am fenster schläft heute fällt leichter regen über straße").split()


def make_sentences(words, n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))).capitalize() + "." for _ in range(n)]


def train_byte_level_tokenizer(texts, vocab_size=300):
    """A GPT-2 style byte-level BPE tokenizer trained on ``texts``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def train_sentencepiece_tokenizer(texts, vocab_size=600, bos=True):
    """A SentencePiece/Llama-style tokenizer: BPE over '▁'-prefixed words (Metaspace), byte fallback for unseen
    characters (<0x..> tokens, not special), and BOS <s> prepended by a TemplateProcessing post-processor."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return add_bos(out) if bos else out


def add_bos(tokenizer):
    """Make ``tokenizer(text)`` prepend its BOS token (a TemplateProcessing post-processor), in place."""
    from tokenizers import processors

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    return tokenizer


@pytest.fixture(scope="session")
def en_tokenizer():
    return train_byte_level_tokenizer(make_sentences(WORDS_EN, 400))


@pytest.fixture(scope="session")
def en_gpt2_dir(tmp_path_factory, en_tokenizer):
    """A tiny random GPT-2 saved as an HF model dir with the English tokenizer, for CLI tests (read-only)."""
    from hf_models import make_hf_model

    d = tmp_path_factory.mktemp("en_gpt2")
    make_hf_model("gpt2", vocab_size=len(en_tokenizer)).save_pretrained(d)
    en_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def de_tokenizer():
    return train_byte_level_tokenizer(make_sentences(WORDS_DE, 400, seed=1), vocab_size=320)


# `clp-jax demo` sized for tests: a German text, 4 strategies, one-layer helper, 4 training steps, 2 SFT steps.
DEMO_TINY = ["language=de", "held_out_docs=20", "eval.seq_len=32", "strategies=[fvt,clp,mean,from-scratch,random]",
             "helper.vocab_size=320", "helper.layers=1", "helper.width=16", "helper.heads=2", "helper.steps=4",
             "helper.batch_size=8", "helper.seq_len=32", "train.steps=4", "train.eval_every=2", "train.seq_len=32",
             "train.batch_size=8", "train.learning_rate=1e-3", "sft.steps=2", "sft.english=16", "sft.target=8",
             "sft.eval_examples=4", "sft.seq_len=64"]


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory, en_tokenizer):
    """Stand-ins for the demo's fetched inputs: a tiny random Llama with the English tokenizer, German text."""
    from hf_models import make_hf_model

    root = tmp_path_factory.mktemp("demo_inputs")
    make_hf_model("llama-tied", vocab_size=len(en_tokenizer)).save_pretrained(root / "source")
    en_tokenizer.save_pretrained(root / "source")
    (root / "de.txt").write_text("\n".join(make_sentences(WORDS_DE, 300, seed=3)) + "\n", encoding="utf-8")
    return root / "source", root / "de.txt"
