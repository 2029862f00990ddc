"""`clp-jax convert --gguf`: tiny GGUF files written the way llama.cpp's converter writes them (gguf-py's own
HF -> GGUF name table, its q/k row permutation, Gemma's 1 + w norms, GPT-2's transposed projections, some
tensors quantized) convert into HF dirs that match transformers' own GGUF loading: logits, config, tokenizer.
Where that loader drops what the file states (Qwen3's head_dim, Llama 3's rope_freqs, Gemma 3's attention scale
and RoPE scaling), the oracle is the source model itself.
"""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import WORDS_EN, make_sentences, train_byte_level_tokenizer
from gguf import GGMLQuantizationType as Q

from clp_jax import models
from clp_jax.cli.main import main

TEXTS = make_sentences(WORDS_EN, 6, seed=3) + ["the garden is green", "Le jardin est vert."]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
             "gemma3": gguf.MODEL_ARCH.GEMMA3, "gpt2": gguf.MODEL_ARCH.GPT2}


# ---- tiny vocabularies, written as llama.cpp writes tokenizer metadata ----

def byte_level_vocab(extra=()):
    """(tokens, token types, merges) of a tiny byte-level BPE (the `gpt2` tokenizer kind)."""
    tok = train_byte_level_tokenizer(make_sentences(WORDS_EN, 200), vocab_size=300)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    tokens = tok.convert_ids_to_tokens(list(range(len(tok)))) + list(extra)
    types = [3 if t in ("<|endoftext|>", *extra) else 1 for t in tokens]
    return dict(kind="gpt2", tokens=tokens, types=types, merges=[" ".join(m) for m in merges], bos=0, eos=0)


def sentencepiece_vocab(specials):
    """(tokens, token types, scores) of a tiny SentencePiece-style BPE (the `llama` tokenizer kind)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tmodels

    tok = Tokenizer(tmodels.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(make_sentences(WORDS_EN, 200), trainers.BpeTrainer(
        vocab_size=250, special_tokens=list(specials), show_progress=False))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    types = [2 if t == "<unk>" else 3 if t in specials else 1 for t in tokens]
    return dict(kind="llama", tokens=tokens, types=types, scores=[-float(i) for i in range(len(tokens))])


def write_vocab(w, vocab, pre, chat_template=None, add_bos=None):
    w.add_tokenizer_model(vocab["kind"])
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    ids = {t: i for i, t in enumerate(vocab["tokens"])}
    for role, token in vocab["special"].items():
        getattr(w, f"add_{role}_token_id")(ids[token])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)


# ---- tiny random HF models and their GGUF files ----

def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
            gemma = cfg.model_type == "gemma3_text"
            p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p) if norm else 0.08 * torch.randn_like(p))
    return model


def llama_cpp_layout(arch, cfg, name, a):
    """What llama.cpp's converter does to an HF tensor before writing it."""
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return a + 1
    if arch == "gpt2" and name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")):
        return a.T  # GPT-2's Conv1D stores [in, out]
    return a


def add_tensor(w, name, a, quant):
    qtype = quant.get(name.rsplit(".", 1)[0].split(".")[-1]) if name.endswith(".weight") else None
    if qtype == Q.F16:
        w.add_tensor(name, a.astype(np.float16))
    elif qtype is not None:
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a), qtype), raw_dtype=qtype)
    else:
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))


def llama3_rope_freqs(rope, head_dim):
    """llama.cpp's rope_freqs tensor for HF llama3 rope_parameters (what each frequency is divided by)."""
    inv = rope["rope_theta"] ** -(np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv
    orig, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                               rope["high_freq_factor"], rope["factor"])
    smooth = (orig / wavelen - low) / (high - low)
    out = np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor
                                                                                         + smooth)))
    return out.astype(np.float32)


def write_gguf(path, arch, model, vocab, quant=(), pre="default", chat_template=None, add_bos=None, meta=()):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        layers = cfg.n_layer
    else:
        rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(rope["rope_theta"])
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        if rope.get("rope_type") == "llama3":
            w.add_tensor("rope_freqs.weight", llama3_rope_freqs(rope, cfg.head_dim))
        if arch == "llama":
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_vocab_size(cfg.vocab_size)
        if arch in ("qwen3", "gemma3"):
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if arch == "gemma3":
            w.add_sliding_window(cfg.sliding_window)
        layers = cfg.num_hidden_layers
    for key, value in dict(meta).items():
        w.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32)
    write_vocab(w, vocab, pre, chat_template, add_bos)
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], layers)
    state = model.state_dict()
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings and arch != "gpt2":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        add_tensor(w, name, llama_cpp_layout(arch, cfg, name, t.float().numpy()), dict(quant))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def case_llama():  # GQA (permutation with kv heads), untied, SentencePiece vocab with a chat template
    vocab = sentencepiece_vocab(["<unk>", "<s>", "</s>", *CHAT_TOKENS])
    vocab["special"] = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}
    cfg = transformers.LlamaConfig(vocab_size=len(vocab["tokens"]), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False, max_position_embeddings=128, rope_theta=50000.0)
    quant = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_gate": Q.Q5_0, "ffn_down": Q.F16,
             "token_embd": Q.Q8_0, "output": Q.Q5_1}
    return cfg, vocab, dict(quant=quant, chat_template=CHAT)


def case_qwen2():  # q/k/v biases, tied, byte-level vocab with Qwen2's split regex
    vocab = byte_level_vocab(CHAT_TOKENS)
    vocab["special"] = {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}
    cfg = transformers.Qwen2Config(vocab_size=len(vocab["tokens"]), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, max_position_embeddings=128)
    return cfg, vocab, dict(quant={"attn_v": Q.Q8_0, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0}, pre="qwen2",
                            chat_template=CHAT, add_bos=False)


def case_qwen3(head_dim=128):  # q/k norms; transformers' table drops key_length, so its default (128) must match
    vocab = byte_level_vocab(CHAT_TOKENS)
    vocab["special"] = {"bos": "<|endoftext|>", "eos": "<|im_end|>"}
    cfg = transformers.Qwen3Config(vocab_size=len(vocab["tokens"]), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=head_dim, tie_word_embeddings=False, max_position_embeddings=128)
    return cfg, vocab, dict(quant={"attn_q": Q.Q8_0, "attn_output": Q.Q4_1, "output": Q.Q8_0}, pre="qwen2")


def case_gemma3(head_dim=256, **extra):  # 1 + w norms; transformers' default query_pre_attn_scalar is 256
    vocab = sentencepiece_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])  # GemmaTokenizer adds <mask>
    vocab["special"] = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(vocab["tokens"]), hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        sliding_window=4, max_position_embeddings=128, **extra)
    return cfg, vocab, dict(quant={"attn_q": Q.Q8_0, "ffn_gate": Q.Q4_0, "token_embd": Q.Q8_0}, add_bos=True)


def case_gpt2():  # llama.cpp writes token_embd again as output.weight; transformers' table leaves n_positions 1024
    vocab = byte_level_vocab()
    vocab["special"] = {"bos": "<|endoftext|>", "eos": "<|endoftext|>"}
    cfg = transformers.GPT2Config(vocab_size=len(vocab["tokens"]), n_embd=64, n_layer=2, n_head=4,
                                  n_positions=1024)
    return cfg, vocab, dict(quant={"attn_qkv": Q.Q8_0, "ffn_up": Q.Q4_0}, pre="gpt2")


CASES = {"llama": case_llama, "qwen2": case_qwen2, "qwen3": case_qwen3, "gemma3": case_gemma3, "gpt2": case_gpt2}


def transformers_gguf_model(path):
    """transformers' own GGUF loading, as `from_pretrained(gguf_file=)` runs it for these architectures (its legacy
    path: config and tensors from `load_gguf_checkpoint`), without the accelerate package it insists on."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set()), missing
    model.tie_weights()
    return model


def logits(model, tokenizer):
    ids = tokenizer(TEXTS[0]).input_ids
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (gguf path, converted dir, summary) for every architecture, converted once through the CLI."""
    done = {}
    for name, case in CASES.items():
        cfg, vocab, opts = case()
        d = tmp_path_factory.mktemp(f"gguf_{name}")
        path = write_gguf(d / f"{name}.gguf", name, random_model(cfg), vocab, **opts)
        out = d / "hf"
        assert main(["convert", "--gguf", str(path), "--out", str(out)]) == 0
        done[name] = path, out
    return done


@pytest.mark.parametrize("name", list(CASES))
def test_converted_dir_matches_transformers_gguf_loading(name, converted):
    path, out = converted[name]
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(tok) is type(ref_tok) and len(tok) == len(ref_tok)
    assert tok.special_tokens_map == ref_tok.special_tokens_map
    assert tok.chat_template == ref_tok.chat_template
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok(text).input_ids == ref_tok(text).input_ids
    if tok.chat_template:
        msgs = [{"role": "user", "content": "the house"}]
        assert tok.apply_chat_template(msgs) == ref_tok.apply_chat_template(msgs)

    ref = transformers_gguf_model(path)
    mine = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(logits(mine, tok), logits(ref, ref_tok), atol=1e-5, rtol=0)

    ref_cfg, cfg = ref.config.to_dict(), json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "rms_norm_eps", "layer_norm_epsilon", "head_dim",
                "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "sliding_window", "layer_types",
                "query_pre_attn_scalar", "bos_token_id", "eos_token_id", "pad_token_id", "model_type"):
        assert cfg.get(key) == ref_cfg.get(key), key
    gen = json.loads((out / "generation_config.json").read_text())
    assert all(gen.get(k) == cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))


def test_summary_and_bfloat16(converted, tmp_path, capsys):
    from safetensors import safe_open

    path, out = converted["llama"]
    code, stdout, err = run_cli(["convert", "--gguf", path, "--out", tmp_path / "bf16", "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["architecture"] == "llama" and summary["model_type"] == "llama" and summary["tensors"] == 21
    assert summary["quantization"] == {"F16": 2, "F32": 9, "Q4_0": 2, "Q4_1": 2, "Q5_0": 2, "Q5_1": 1, "Q8_0": 3}
    assert summary["parameters"] == sum(p.numel() for p in random_model(case_llama()[0]).parameters())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f, \
            safe_open(out / "model.safetensors", "pt") as g:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k).bfloat16()), k


def test_eval_on_converted_dirs_matches_transformers(converted, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    for name, (path, out) in converted.items():
        hf = transformers.AutoConfig.from_pretrained(out)
        if hf.model_type not in models.SUPPORTED_MODEL_TYPES:
            continue  # the JAX model family is not there yet
        code, stdout, err = run_cli(["eval", "--model", out, "--data", data, "--seq-len", 64, "--batch-size", 4],
                                    capsys)
        assert code == 0, err
        result = json.loads(stdout.strip().splitlines()[-1])
        tok = transformers.AutoTokenizer.from_pretrained(out)
        model = transformers_gguf_model(path)
        nll = count = 0.0
        for text in TEXTS:
            ids = torch.tensor([tok(text).input_ids[:64]])
            with torch.no_grad():
                loss = model(ids, labels=ids).loss.item()
            nll, count = nll + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
        assert result["tokens"] == count
        assert abs(result["loss"] - nll / count) <= 1e-4 * nll / count, (name, result["loss"], nll / count)


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "llama3"])
def test_metadata_transformers_drops_is_kept(name, tmp_path):
    """Unquantized files whose true config transformers' GGUF table loses: the source model is the oracle."""
    if name == "qwen3":
        cfg, vocab, opts = case_qwen3(head_dim=16)
    elif name == "gemma3":
        cfg, vocab, opts = case_gemma3(head_dim=16, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    else:
        cfg, vocab, opts = case_llama()
        cfg.head_dim = 16
        cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(**cfg.to_dict())
    model = random_model(cfg)
    path = write_gguf(tmp_path / f"{name}.gguf", "llama" if name == "llama3" else name, model, vocab,
                      **dict(opts, quant={}))
    from clp_jax.hf.gguf import convert_gguf

    convert_gguf(str(path), str(tmp_path / "hf"), progress=False)
    mine = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        np.testing.assert_allclose(mine(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-5, rtol=0)
    assert mine.config.rope_parameters == model.config.rope_parameters


def test_conversion_imports_no_torch(converted, tmp_path):
    path, out = converted["qwen2"]
    code = ("import sys; sys.modules['torch'] = None\n"
            "from clp_jax.hf.gguf import convert_gguf\n"
            f"convert_gguf({str(path)!r}, {str(tmp_path / 'hf')!r}, progress=False)\n"
            "import transformers; assert not transformers.utils.is_torch_available()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (out / name).read_bytes(), name  # same as with torch


def write_odd_gguf(path, arch="llama", qtype=None):
    """A tiny llama-shaped file with another architecture name, or one tensor in a type gguf cannot dequantize."""
    cfg, vocab, _ = case_llama()
    model = random_model(transformers.LlamaConfig(**dict(cfg.to_dict(), num_hidden_layers=1)))
    write_gguf(path, "llama", model, vocab)
    if arch == "llama" and qtype is None:
        return path
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(path) + ".tmp", arch)
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name.replace("llama.", f"{arch}."), value)
        else:
            w.add_key_value(field.name.replace("llama.", f"{arch}."), value, field.types[0])
    for t in reader.tensors:
        if qtype is not None and t.name == "blk.0.attn_v.weight":
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = t.data.shape
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".tmp", path)
    return path


def test_errors_are_one_line_and_write_nothing(converted, tmp_path, capsys):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, this is not a model\n")
    good, out = converted["llama"]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        (write_odd_gguf(tmp_path / "mamba.gguf", arch="mamba"), "GGUF architecture 'mamba' is not supported"),
        (write_odd_gguf(tmp_path / "q81.gguf", qtype=Q.Q8_1), "blk.0.attn_v.weight has quantization type Q8_1"),
        (text, "not a GGUF file"),
        (truncated, "unreadable GGUF file"),
        (tmp_path / "missing.gguf", "GGUF file not found"),
    ]
    capsys.readouterr()
    for path, fragment in cases:
        code, stdout, err = run_cli(["convert", "--gguf", path, "--out", tmp_path / "out"], capsys)
        assert code == 2, (path, err)
        assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert stdout == "" and str(path.name) in err
        assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["convert", "--gguf", good, "--out", out], capsys)
    assert code == 2 and "output directory exists (pass --overwrite" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
