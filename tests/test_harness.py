"""`clp-jax` as an lm-evaluation-harness model: lm-eval's real pipeline on local tasks, against transformers'
PyTorch model of the same weights and `clp-jax eval`'s per-document NLL."""

import glob
import json
import math
import os
import tempfile

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="clp-jax-test-datasets-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from conftest import WORDS_EN, make_sentences, train_sentencepiece_tokenizer  # noqa: E402
from hf_models import make_hf_model  # noqa: E402

from clp_jax.cli.main import main  # noqa: E402

pytest.importorskip("lm_eval")


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval's CLI without its built-in task index (about 16 s to build here): only --include_path tasks."""
    import lm_eval.tasks

    class LocalTaskManager(lm_eval.tasks.TaskManager):
        def __init__(self, *args, include_defaults=False, **kwargs):
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTaskManager)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama whose SentencePiece-style tokenizer prepends BOS (as Llama's does)."""
    d = tmp_path_factory.mktemp("harness_llama")
    tok = train_sentencepiece_tokenizer(make_sentences(WORDS_EN, 300, seed=4), vocab_size=400)
    make_hf_model("llama-tied", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def continuation_logprob(model, tok, context, continuation):
    """Torch float64 log p(continuation | context) and whether greedy decoding produces it, tokenized as lm-eval
    does: the pair encoded whole, the continuation being the tokens past the context's encoding."""
    whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    rows = range(len(ctx) - 1, len(whole) - 1)
    targets = whole[len(ctx):]
    lp = sum(float(logp[r, t]) for r, t in zip(rows, targets))
    return lp, all(int(logp[r].argmax()) == t for r, t in zip(rows, targets))


def greedy_text(model, tok, prompt, n):
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def write_task(root, name, rows, **spec):
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = dict(task=name, dataset_path="json", dataset_kwargs={"data_files": {"test": str(path)}},
                test_split="test", **spec)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def mc_task(root, name, seed):
    rng = np.random.default_rng(seed)
    rows = [{"question": " ".join(rng.choice(WORDS_EN, 5)).capitalize(),
             "choices": [" ".join(rng.choice(WORDS_EN, int(k))) for k in rng.integers(1, 4, 3)],
             "label": int(rng.integers(3))} for _ in range(6)]
    write_task(root, name, rows, output_type="multiple_choice", doc_to_text="{{question}}", doc_to_choice="choices",
               doc_to_target="label", metric_list=[{"metric": "acc"}])
    return rows


def run_lm_eval(argv, out, capsys):
    code = main(["lm-eval", *map(str, argv), "--output_path", str(out), "--log_samples"])
    assert code == 0, capsys.readouterr().err
    return json.loads(open(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read())["results"]


def samples_of(samples_dir, task):
    path = glob.glob(f"{samples_dir}/**/samples_{task}_*.jsonl", recursive=True)[0]
    return sorted((json.loads(line) for line in open(path)), key=lambda r: r["doc_id"])


def test_lm_eval_pipeline_matches_torch_and_clp_jax_eval(llama_dir, tmp_path, capsys, local_tasks_only):
    from clp_jax.eval.perplexity import evaluate_model_dir
    from clp_jax.sharding import make_mesh

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = mc_task(tasks, "tiny_mc", seed=0)
    texts = make_sentences(WORDS_EN, 5, seed=11)
    write_task(tasks, "tiny_rolling", [{"text": t} for t in texts], output_type="loglikelihood_rolling",
               doc_to_text="", doc_to_target="{{text}}", metric_list=[{"metric": "bits_per_byte"}])
    prompts = ["The house is", "A child reads"]
    full = greedy_text(model, tok, prompts[0], 8)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(full) > 4 and stop.strip() and 0 < full.find(stop) < len(full)
    write_task(tasks, "tiny_gen", [{"prompt": p, "answer": "x"} for p in prompts], output_type="generate_until",
               doc_to_text="{{prompt}}", doc_to_target="answer", metric_list=[{"metric": "exact_match"}],
               generation_kwargs={"until": [stop], "max_gen_toks": 8, "do_sample": False})
    out = tmp_path / "out"
    results = run_lm_eval(["--model_args", f"pretrained={llama_dir},batch_size=4", "--tasks",
                              "tiny_mc,tiny_rolling,tiny_gen", "--include_path", tasks], out, capsys)

    # multiple choice: each choice's loglikelihood and greediness as torch computes them; acc by hand from those
    hits = []
    for sample, doc in zip(samples_of(out, "tiny_mc"), mc):
        oracle = [continuation_logprob(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        got = [(float(lp), greedy == "True") for ((lp, greedy),) in sample["resps"]]  # logged as strings
        np.testing.assert_allclose([g[0] for g in got], [o[0] for o in oracle], rtol=1e-5, atol=1e-5)
        assert [g[1] for g in got] == [o[1] for o in oracle]
        hits.append(int(np.argmax([o[0] for o in oracle])) == doc["label"])
    assert results["tiny_mc"]["acc,none"] == pytest.approx(np.mean(hits))

    # rolling: after BOS, the same NLL and bits per byte as `clp-jax eval` on the same texts
    rolling = [float(s["resps"][0][0]) for s in samples_of(out, "tiny_rolling")]
    ref = evaluate_model_dir(str(llama_dir), texts, make_mesh(data=-1), seq_len=128, progress=False)
    assert -sum(rolling) == pytest.approx(ref.loss * ref.tokens, rel=1e-5)
    assert results["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(ref.bits_per_byte, rel=1e-5)
    for text, got in zip(texts, rolling):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        assert got == pytest.approx(sum(float(logp[j - 1, ids[j]]) for j in range(1, len(ids))), rel=1e-5)

    # generation: greedy text cut before the stop string; the other prompt runs to max_gen_toks
    gen = [s["resps"][0][0] for s in samples_of(out, "tiny_gen")]
    assert gen[0] == full.split(stop)[0] and len(gen[0]) < len(full)
    assert gen[1] == greedy_text(model, tok, prompts[1], 8).split(stop)[0]


def test_truncation_and_rolling_windows_match_torch(llama_dir):
    """Contexts longer than max_length are cut from the left, as lm-eval's HF backend does; rolling windows
    predict every token once."""
    from lm_eval.api.instance import Instance

    from clp_jax.eval.harness import ClpJaxLM

    lm = ClpJaxLM.create_from_arg_string(f"pretrained={llama_dir},max_length=12", {"batch_size": 3})
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tok = lm.tokenizer
    text = " ".join(make_sentences(WORDS_EN, 3, seed=5))
    ids = tok(text)["input_ids"]
    assert len(ids) > 30
    pairs = [(ids[:k], ids[k:k + 3]) for k in (2, 9, 25, 29)] + [(ids[:1], ids[1:12])]
    got = lm._score(pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        window = (ctx + cont)[-13:]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0].double(), -1)
        rows = range(len(window) - 1 - len(cont), len(window) - 1)
        assert lp == pytest.approx(sum(float(logp[r, t]) for r, t in zip(rows, cont)), rel=1e-5, abs=1e-5)
        assert greedy == all(int(logp[r].argmax()) == t for r, t in zip(rows, cont))

    rolled = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    body = tok(text, add_special_tokens=False)["input_ids"]
    seq = [tok.bos_token_id] + body
    with torch.no_grad():  # each token once, after up to 12 tokens of context (the window it falls in)
        total, done = 0.0, 0
        while done < len(body):
            end = min(done + 12, len(body))
            start = max(0, end - 12)
            logp = torch.log_softmax(model(torch.tensor([seq[start:end]])).logits[0].double(), -1)
            total += sum(float(logp[j - 1 - start, seq[j]]) for j in range(done + 1, end + 1))
            done = end
    assert rolled == pytest.approx(total, rel=1e-5)
    assert lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("",), 0)]) == [0.0]


def test_errors_are_one_line(llama_dir, tmp_path, capsys, local_tasks_only):
    mc_task(tmp_path, "tiny_mc", seed=0)
    cases = [(f"pretrained={llama_dir},bogus=1", "model_args: unknown key 'bogus'"),
             (f"pretrained={llama_dir},max_length=0", "model_args: max_length must be a positive integer"),
             (f"pretrained={tmp_path / 'none'}", "none: model directory not found")]
    for model_args, fragment in cases:
        code = main(["lm-eval", "--model_args", model_args, "--tasks", "tiny_mc", "--include_path", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and "clp-jax lm-eval: error: " in err and fragment in err, err


def test_transferred_model_through_lm_eval(tmp_path, capsys, en_tokenizer, de_tokenizer):
    """`clp-jax transfer` output is an lm-eval model: acc on a local task from torch's loglikelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from clp_jax.eval.harness import ClpJaxLM

    for name, kind, tok, kw in (("source", "llama-tied", en_tokenizer, {}),
                                ("helper", "gpt2", de_tokenizer, dict(n_embd=16, n_head=2))):
        make_hf_model(kind, vocab_size=len(tok), **kw).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "clp"
    assert main(["transfer", "--source", str(tmp_path / "source"), "--helper", str(tmp_path / "helper"), "--out",
                 str(out), "--strategy", "clp"]) == 0, capsys.readouterr().err
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = mc_task(tasks, "tiny_mc_de", seed=1)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    results = lm_eval.simple_evaluate(model=ClpJaxLM(pretrained=str(out), batch_size=4), tasks=["tiny_mc_de"],
                                      task_manager=manager)["results"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    hits = [int(np.argmax([continuation_logprob(model, tok, d["question"], " " + c)[0] for c in d["choices"]]))
            == d["label"] for d in mc]
    assert results["tiny_mc_de"]["acc,none"] == pytest.approx(np.mean(hits))
    assert not math.isnan(results["tiny_mc_de"]["acc,none"])
