"""Generation: KV-cached greedy decoding against full recomputation and transformers, EOS, sampling, the CLI."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
from hf_models import make_hf_model

from clp_jax import models
from clp_jax.cli.main import main
from clp_jax.hf.reader import eos_ids, load_params
from clp_jax.posttrain.generate import encode_prompts, generate, generate_arrays, left_pad, pad_token_id
from clp_jax.sharding import make_mesh

LENGTHS = (5, 11, 1)  # prompts of different lengths, one of a single token
N = 10


@functools.cache
def setup(name, tmp_root):
    """(HF model, cfg, params, prompts, mesh) for a tiny model; llama-gqa-untied and gemma3 run on a 2x2x2 mesh,
    the others on one device."""
    hf = make_hf_model(name)
    path = f"{tmp_root}/{name}"
    hf.save_pretrained(path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2) if name in ("llama-gqa-untied", "gemma3") else None
    cfg, params = load_params(path, mesh or make_mesh(devices=jax.devices()[:1]), progress=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, n).tolist() for n in LENGTHS]
    return hf, cfg, params, prompts, mesh


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@functools.cache
def greedy(name, tmp_root):
    _, cfg, params, prompts, mesh = setup(name, tmp_root)
    return generate(params, cfg, prompts, max_new_tokens=N, eos_id=None, pad_id=0, mesh=mesh)


def full_recompute_greedy(cfg, params, prompts, n):
    """Argmax of the uncached model on the growing, right-padded sequences (one fixed shape, one compile)."""
    t = max(map(len, prompts)) + n
    fn = jax.jit(lambda p, ids, seg: models.apply(p, cfg, ids, segment_ids=seg))
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        ids = np.zeros((len(seqs), t), np.int32)
        seg = np.zeros((len(seqs), t), np.int32)
        for r, s in enumerate(seqs):
            ids[r, :len(s)], seg[r, :len(s)] = s, 1
        logits = np.asarray(fn(params, ids, seg))
        for r, s in enumerate(seqs):
            s.append(int(logits[r, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied", "llama3-rope", "bloom", "mistral-window",
                                  "qwen3-tied-window", "gemma3", "gemma3-softcap", "gemma2"])
def test_kv_cache_greedy_equals_full_recomputation(name, tmp_root):
    _, cfg, params, prompts, _ = setup(name, tmp_root)
    ours = greedy(name, tmp_root)
    assert [len(o) for o in ours] == [N] * len(prompts)
    assert ours == full_recompute_greedy(cfg, params, prompts, N)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied", "qwen3-tied-window", "gemma3", "gemma2"])
def test_greedy_equals_transformers_generate(name, tmp_root):
    hf, _, _, prompts, _ = setup(name, tmp_root)
    eos = hf.generation_config.eos_token_id
    for prompt, ours in zip(prompts, greedy(name, tmp_root)):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=N, pad_token_id=eos)
        ref = out[0, len(prompt):].tolist()  # stops after EOS; ours (no EOS given) runs on
        assert len(ref) == N or ref[-1] == eos
        assert ours[:len(ref)] == ref


def test_eos_cuts_rows_at_different_steps_and_stops_early(tmp_root):
    _, cfg, params, prompts, _ = setup("gpt2", tmp_root)
    full = greedy("gpt2", tmp_root)
    # One EOS id per row, chosen so the rows stop at different steps, all before N.
    eos = [full[0][2], full[1][4], full[2][6]]
    cuts = [next(i for i, t in enumerate(row) if t in eos) for row in full]
    assert len(set(cuts)) > 1 and max(cuts) < N - 1
    tokens, lengths = left_pad(prompts, 0, len(prompts))
    out, steps = generate_arrays(params, cfg, tokens, lengths, max_new_tokens=N, eos_id=eos, pad_id=299)
    assert steps == max(cuts) + 1 < N
    for row, ref, cut in zip(out.tolist(), full, cuts):
        assert row[:cut + 1] == ref[:cut + 1] and row[cut] in eos
        assert row[cut + 1:] == [299] * (N - cut - 1)
    assert generate(params, cfg, prompts, max_new_tokens=N, eos_id=eos, pad_id=0) == [r[:c] for r, c in
                                                                                       zip(full, cuts)]


def test_sampling_seeds_temperature_and_top_k(tmp_root):
    _, cfg, params, prompts, _ = setup("gpt2", tmp_root)
    sample = functools.partial(generate, params, cfg, prompts, max_new_tokens=N, eos_id=None, pad_id=0)
    a, b = sample(temperature=1.0, seed=1), sample(temperature=1.0, seed=2)
    assert a == sample(temperature=1.0, seed=1)
    assert a != b
    assert a != greedy("gpt2", tmp_root)
    assert sample(temperature=1e-7, seed=3) == greedy("gpt2", tmp_root)
    assert sample(temperature=1.0, top_k=1, seed=4) == greedy("gpt2", tmp_root)


def test_cli_chat_completions_are_the_greedy_tokens_of_the_sft_prompts(en_gpt2_dir, en_tokenizer, capsys):
    prompts = ["the house is small", "a child reads a book while the old man", "rain"]
    ids = encode_prompts(en_tokenizer, prompts, chat=True)  # no chat template: the SFT format, prompt + newline
    assert ids == [en_tokenizer(p + "\n", add_special_tokens=False)["input_ids"] for p in prompts]
    assert encode_prompts(en_tokenizer, []) == []
    args = ["generate", "--model", str(en_gpt2_dir), "--chat", "--max-new-tokens", str(N)]
    assert main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mesh = make_mesh(data=-1)  # the CLI's default mesh
    cfg, params = load_params(str(en_gpt2_dir), mesh, progress=False)
    expected = generate(params, cfg, ids, max_new_tokens=N, eos_id=eos_ids(str(en_gpt2_dir), en_tokenizer),
                        pad_id=pad_token_id(en_tokenizer), mesh=mesh)
    assert result["completions"] == en_tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert result["tokens"] == sum(len(row) for row in expected) > 0


def test_cli_prints_completions_and_json(en_gpt2_dir, capsys):
    code = main(["generate", "--model", str(en_gpt2_dir), "--prompt", "the house is", "--prompt", "a child reads a",
                 "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert len(result["completions"]) == 2 and result["tokens_per_s"] > 0 and 0 < result["tokens"] <= 12
    assert "=== [1] the house is" in out and "=== [2] a child reads a" in out
    for completion in result["completions"]:
        assert completion in out


def test_cli_errors(en_gpt2_dir, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "missing"), "--prompt", "x"], "missing: model directory not found"),
        (["--model", str(en_gpt2_dir), "--prompt", "x", "--max-new-tokens", "100"], "learned positions"),
        (["--model", str(en_gpt2_dir), "--prompt", "x", "--chat", "--max-new-tokens", "0"], "--max-new-tokens"),
        *[(["--model", str(en_gpt2_dir), "--prompt", "x", f"--temperature={t}"], "--temperature must be a finite")
          for t in ("nan", "inf", "-inf", "-0.5")],
        (["--model", str(en_gpt2_dir), "--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
        (["--model", str(en_gpt2_dir), "--prompt", "x", "--top-k=-3"], "--top-k must be >= 1"),
    ]
    for argv, fragment in cases:
        code = main(["generate", *argv])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", (argv, err)
        assert fragment in err and len(err.strip().splitlines()) == 1, err
