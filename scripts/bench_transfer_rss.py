"""Measure the peak resident memory of `clp-jax transfer` on a GPT-2 XL-sized checkpoint: streamed or held whole?

Builds once, into --work, a random GPT-2 source in bfloat16 (48 layers, width 1600, a 50257-token byte-level BPE
trained here on generated text: 1.56B parameters, 3.1 GB), a 32000-token target tokenizer trained on partly
different text, and for `clp` a small helper GPT-2 with that tokenizer. Every tensor is written as it is drawn
(N(0, 0.02), LayerNorm scales 1), so building holds one tensor at a time too. Then it runs `clp-jax transfer`
once per strategy, each into a fresh --out that is deleted afterwards, under a bare Python wrapper that reports
its child's ru_maxrss (the peak RSS); /proc/PID/status is sampled alongside to split anonymous and file-backed
memory and to tell in which phase the peak fell. The baselines are the same measurement of a process that only
imports clp_jax and starts JAX (jax.devices()), and of one that also does what the transfer does before it
reads a tensor (imports, config.json, both tokenizers). Prints a table to stderr and, last on stdout, one JSON
line.

    python scripts/bench_transfer_rss.py [--size full|small] [--work DIR] [--strategies fvt,clp] [--timeout S]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from clp_jax.cli.main import keep_jax_off_libtpu
from clp_jax.files import atomic_dir
from clp_jax.hf.writer import DEFAULT_MAX_SHARD_BYTES, write_model_dir


@dataclasses.dataclass(frozen=True)
class Size:
    layers: int
    width: int
    heads: int
    vocab: int
    positions: int
    target_vocab: int
    helper_layers: int
    helper_width: int
    helper_heads: int
    lexicon: int  # distinct generated words per language
    source_words: int  # words of text the source tokenizer is trained on
    target_words: int


SIZES = {
    "full": Size(48, 1600, 25, 50257, 1024, 32000, 2, 256, 4, 150_000, 3_000_000, 2_000_000),  # GPT-2 XL
    "small": Size(2, 128, 4, 4000, 256, 2000, 1, 64, 2, 8_000, 200_000, 150_000),
}
TARGET_SHARE_OF_SOURCE_TEXT = 0.8  # of the target tokenizer's text; gives ~45% of its tokens shared
MB = 2**20
EOT = "<|endoftext|>"
RUNTIME_CODE = ("from clp_jax.cli.main import keep_jax_off_libtpu; keep_jax_off_libtpu('transfer'); "
                "import jax; jax.devices()")
# What the transfer does before it reads any tensor: its imports, the source's config (transformers' AutoConfig,
# which imports torch when it is installed) and both tokenizers. argv: source dir, target tokenizer dir.
STARTUP_CODE = RUNTIME_CODE + (
    "; import json, sys, clp_jax.cli.transfer_cmd; from clp_jax.hf.reader import read_config; "
    "from clp_jax.hf.tokenizer import load_tokenizer; read_config(sys.argv[1]); load_tokenizer(sys.argv[1]); "
    "load_tokenizer(sys.argv[2]); print(json.dumps({'torch_imported': 'torch' in sys.modules}))")
PHASES = (  # (marker in the child's stderr, phase that starts there), in order
    ("[transfer]", "load_embeddings"),  # the alignment message comes right before the embeddings are read
    ("[transfer] computing", "compute"),
    ("write safetensors", "write"),
    ("[transfer] wrote", "finish"),
)


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---- inputs --------------------------------------------------------------------------------------------------


def lexicon(seed: int, n: int, onsets: list[str], vowels: list[str], codas: list[str]) -> list[str]:
    """``n`` distinct generated words of 1-4 syllables (onset + vowel + coda)."""
    rng = np.random.default_rng(seed)
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(syllables[i] for i in rng.integers(0, len(syllables), rng.integers(1, 5))))
    return sorted(words)


def zipf_text(seed: int, words: list[str], n_words: int, line: int = 2000) -> Iterator[str]:
    """``n_words`` words drawn with Zipf frequencies (1/rank, random ranks), ``line`` per yielded string."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1)
    ranked = np.asarray(words, dtype=object)[rng.permutation(len(words))]
    for start in range(0, n_words, line):
        yield " ".join(ranked[rng.choice(len(words), min(line, n_words - start), p=p / p.sum())])


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """A GPT-2 style byte-level BPE with ``vocab_size`` tokens (as tests/conftest.py builds them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"the generated text gave a {tok.get_vocab_size()}-token BPE, not {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def tokenizers_for(size: Size):
    """(source, target) tokenizers: the source's text is language A, the target's mostly A and partly B."""
    lang_a = lexicon(0, size.lexicon, list("bcdfghklmnprstvwz") + ["ch", "sh", "th", "st", "tr"],
                     list("aeiou") + ["ai", "ou"], ["", "n", "r", "s", "t"])
    lang_b = lexicon(1, size.lexicon, list("bdfgjklmnprstvz") + ["sch", "pf", "kr", "zw"],
                     list("aeiouäöü") + ["ei", "au"], ["", "n", "r", "ch", "ß"])
    source = train_tokenizer(zipf_text(0, lang_a, size.source_words), size.vocab)
    n_a = int(size.target_words * TARGET_SHARE_OF_SOURCE_TEXT)

    def target_text() -> Iterator[str]:
        yield from zipf_text(2, lang_a, n_a)
        yield from zipf_text(3, lang_b, size.target_words - n_a)

    return source, train_tokenizer(target_text(), size.target_vocab)


def gpt2_config(vocab: int, layers: int, width: int, heads: int, positions: int) -> dict:
    """config.json of a GPT-2 (tied embeddings) stored in bfloat16."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab, "n_positions": positions,
            "n_embd": width, "n_layer": layers, "n_head": heads, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
            "torch_dtype": "bfloat16"}


def gpt2_shapes(vocab: int, layers: int, width: int, positions: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF GPT2LMHeadModel tensor names and shapes (Conv1D weights are [in, out]), in the module order."""
    e = width
    shapes = [("transformer.wte.weight", (vocab, e)), ("transformer.wpe.weight", (positions, e))]
    for i in range(layers):
        h = f"transformer.h.{i}."
        shapes += [(h + "ln_1.weight", (e,)), (h + "ln_1.bias", (e,)), (h + "attn.c_attn.weight", (e, 3 * e)),
                   (h + "attn.c_attn.bias", (3 * e,)), (h + "attn.c_proj.weight", (e, e)),
                   (h + "attn.c_proj.bias", (e,)), (h + "ln_2.weight", (e,)), (h + "ln_2.bias", (e,)),
                   (h + "mlp.c_fc.weight", (e, 4 * e)), (h + "mlp.c_fc.bias", (4 * e,)),
                   (h + "mlp.c_proj.weight", (4 * e, e)), (h + "mlp.c_proj.bias", (e,))]
    return shapes + [("transformer.ln_f.weight", (e,)), ("transformer.ln_f.bias", (e,))]


def random_tensors(shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """bfloat16 tensors drawn one at a time: LayerNorm scales 1, everything else N(0, 0.02)."""
    rng = np.random.default_rng(seed)
    for name, shape in shapes:
        if ".ln_" in name and name.endswith(".weight"):
            yield name, np.ones(shape, ml_dtypes.bfloat16)
        else:
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= 0.02
            yield name, x.astype(ml_dtypes.bfloat16)


def write_gpt2(path: str, config: dict, tokenizer, seed: int) -> None:
    shapes = gpt2_shapes(config["vocab_size"], config["n_layer"], config["n_embd"], config["n_positions"])
    write_model_dir(path, random_tensors(shapes, seed), len(shapes), config, tokenizer=tokenizer)


def build_inputs(root: str, size: Size) -> dict[str, str]:
    """Source model, target tokenizer and helper model dirs under ``root``, each built in a temp dir and renamed
    into place (so an interrupted build is redone), reused when present."""
    from transformers import PreTrainedTokenizerFast

    paths = {k: os.path.join(root, k) for k in ("source", "target_tokenizer", "helper")}
    if all(os.path.isdir(p) for p in paths.values()):
        say(f"reusing the inputs in {root}")
        return paths
    os.makedirs(root, exist_ok=True)
    t = time.perf_counter()
    source_tok, target_tok = tokenizers_for(size)
    say(f"trained the {size.vocab}- and {size.target_vocab}-token tokenizers in {time.perf_counter() - t:.0f} s")
    if not os.path.isdir(paths["target_tokenizer"]):
        atomic_dir(paths["target_tokenizer"], target_tok.save_pretrained)
    target_tok = PreTrainedTokenizerFast.from_pretrained(paths["target_tokenizer"])  # the one the runs read
    if not os.path.isdir(paths["source"]):
        t = time.perf_counter()
        write_gpt2(paths["source"], gpt2_config(size.vocab, size.layers, size.width, size.heads, size.positions),
                   source_tok, seed=0)
        say(f"wrote the source model in {time.perf_counter() - t:.0f} s")
    if not os.path.isdir(paths["helper"]):
        write_gpt2(paths["helper"], gpt2_config(size.target_vocab, size.helper_layers, size.helper_width,
                                                size.helper_heads, size.positions), target_tok, seed=1)
    return paths


# ---- measuring -----------------------------------------------------------------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
    except (OSError, ValueError):
        return {}


# A child's ru_maxrss includes the memory of the process it was forked (vforked) from, up to its exec: measured
# straight from this process it would be at least this process's own peak. So each command is started by a bare
# Python wrapper (about 10 MB), which reports its child's pid, then its ru_maxrss and exit code, on stderr.
WRAPPER = """import os, resource, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
print(f"\\n[rss-wrapper] pid {pid}", file=sys.stderr, flush=True)
status = os.waitpid(pid, 0)[1]
kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"[rss-wrapper] maxrss_kib {kib} exit {os.waitstatus_to_exitcode(status)}", file=sys.stderr, flush=True)
"""


def measure(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd`` (through WRAPPER): its peak RSS (ru_maxrss), sampled peaks by kind and by phase, seconds,
    exit code, and the JSON line it printed last on stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", WRAPPER, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    phase = ["startup_align"]
    child: dict[str, int] = {}
    by_phase: dict[str, int] = {}
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    peak_phase = ["startup_align"]
    stdout: list[str] = []
    stderr: list[str] = []
    done = threading.Event()

    def read_stderr() -> None:
        order = ["startup_align"] + [name for _, name in PHASES]
        for line in proc.stderr:
            if line.startswith("[rss-wrapper] pid "):
                child["pid"] = int(line.split()[-1])
                continue
            if line.startswith("[rss-wrapper] maxrss_kib "):
                words = line.split()
                child["maxrss_kib"], child["exit"] = int(words[2]), int(words[4])
                continue
            stderr.append(line)
            for marker, name in PHASES:  # phases only move forward (the alignment marker matches every message)
                if marker in line and order.index(name) > order.index(phase[0]):
                    phase[0] = name

    def sample() -> None:
        while not done.is_set():
            kib = _status_kib(child["pid"]) if "pid" in child else {}
            for k in peaks:
                if kib.get(k, 0) > peaks[k]:
                    peaks[k] = kib[k]
                    if k == "VmRSS":
                        peak_phase[0] = phase[0]
            if "VmRSS" in kib:
                by_phase[phase[0]] = max(by_phase.get(phase[0], 0), kib["VmRSS"])
            done.wait(0.02)

    def kill() -> None:
        if "pid" in child:
            os.kill(child["pid"], 9)

    threads = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=sample, daemon=True),
               threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)]
    for th in threads:
        th.start()
    timer = threading.Timer(timeout, kill)
    timer.start()
    proc.wait()
    timer.cancel()
    seconds = time.perf_counter() - start
    done.set()
    for th in threads:
        th.join(timeout=5)
    if "maxrss_kib" not in child:
        raise SystemExit(f"the RSS wrapper failed (exit {proc.returncode}): {''.join(stderr[-5:])}")
    last = next((line for line in reversed(stdout) if line.strip()), "")
    try:
        summary = json.loads(last) if last.startswith("{") else None
    except json.JSONDecodeError:
        summary = None
    return {"peak_rss_mb": round(child["maxrss_kib"] / 1024, 1), "seconds": round(seconds, 2),
            "returncode": child["exit"], "timed_out": seconds >= timeout and child["exit"] < 0,
            "sampled_peak_anon_mb": round(peaks["RssAnon"] / 1024, 1),
            "sampled_peak_file_mb": round(peaks["RssFile"] / 1024, 1),
            "peak_phase": peak_phase[0], "rss_by_phase_mb": {k: round(v / 1024, 1) for k, v in by_phase.items()},
            "summary": summary, "stderr_tail": "".join(stderr[-15:])}


def safetensors_headers(model_dir: str) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bytes) over every safetensors file of ``model_dir`` (headers only)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            a, b = entry["data_offsets"]
            out[name] = (entry["dtype"], entry["shape"], b - a)
    return out


def checkpoint_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(model_dir, "*.safetensors")))


def check_output(out: str, source: str, target_vocab: int) -> str | None:
    """None when ``out`` reads back as the source with a [target_vocab, D] embedding and the other tensors
    byte-identical (one checked in full); else what is wrong."""
    from safetensors import safe_open

    from clp_jax.hf.reader import TensorFiles, read_config

    cfg = read_config(out)
    src, got = safetensors_headers(source), safetensors_headers(out)
    if cfg.vocab_size != target_vocab or got.get("transformer.wte.weight", (0, [0]))[1][0] != target_vocab:
        return f"{out}: vocab {cfg.vocab_size}, embedding {got.get('transformer.wte.weight')}; want {target_vocab}"
    if set(src) != set(got) or any(src[k] != got[k] for k in src if k != "transformer.wte.weight"):
        return f"{out}: tensors differ from the source's in names, dtypes or shapes"
    name = f"transformer.h.{cfg.num_layers - 1}.mlp.c_fc.weight"
    with safe_open(TensorFiles(source).files[name], framework="numpy") as f:
        want = f.get_tensor(name)
    with safe_open(TensorFiles(out).files[name], framework="numpy") as f:
        if not np.array_equal(f.get_tensor(name).view(np.uint16), want.view(np.uint16)):
            return f"{out}: {name} is not the source's"
    return None


def measure_transfer(strategy: str, paths: dict[str, str], size: Size, timeout: float, startup_mb: float,
                     estimate_mb: float) -> dict:
    """One `clp-jax transfer` run into a fresh --out: its measurement, output size and check, then --out removed."""
    out = os.path.join(os.path.dirname(paths["source"]), f"out-{strategy}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "clp_jax.cli.main", "transfer", "--source", paths["source"],
           "--helper-tokenizer", paths["target_tokenizer"], "--out", out, "--strategy", strategy]
    if strategy != "fvt":
        cmd += ["--helper", paths["helper"]]
    say(f"{strategy}: {' '.join(cmd[2:])}")
    run = measure(cmd, timeout)
    ok = run["returncode"] == 0
    if not ok:
        print(run["stderr_tail"], file=sys.stderr)
        say(f"{strategy}: exit code {run['returncode']}{' (timed out)' if run['timed_out'] else ''}")
    run["output_bytes"] = checkpoint_bytes(out) if ok else 0
    run["output_error"] = check_output(out, paths["source"], size.target_vocab) if ok else "no output"
    shutil.rmtree(out, ignore_errors=True)
    summary = run.pop("summary") or {}
    run["shared_tokens"], run["child_seconds"] = summary.get("shared_tokens"), summary.get("seconds")
    run["above_baseline_mb"] = round(run["peak_rss_mb"] - startup_mb, 1)
    run["streamed_estimate_mb"] = round(estimate_mb, 1)
    output_mb = run["output_bytes"] / MB
    run["rss_ratio"] = round(run["peak_rss_mb"] / output_mb, 4) if ok else None
    run["verdict"] = verdict(run["peak_rss_mb"], estimate_mb, output_mb) if ok else "failed"
    if ok:
        run.pop("stderr_tail")
    say(f"{strategy}: peak RSS {run['peak_rss_mb']:.0f} MB in {run['seconds']:.0f} s")
    return run


# ---- report --------------------------------------------------------------------------------------------------


def verdict(peak_mb: float, expected_mb: float, checkpoint_mb: float) -> str:
    if checkpoint_mb < 1024:
        return "too small to tell"
    if peak_mb >= checkpoint_mb:
        return "held whole"
    return "streamed" if peak_mb <= 1.5 * expected_mb else "partly buffered"


def table(result: dict) -> None:
    runs = result["runs"]
    names = list(runs)
    gb = 1e9

    def row(label: str, values: list[str]) -> str:
        return f"  {label:<56}" + "".join(f"{v:>20}" for v in values)

    print(f"clp-jax transfer peak RSS, {result['size']}: GPT-2 {result['layers']}x{result['width']}, "
          f"{result['params'] / 1e9:.3f}B params in bfloat16, vocab {result['source_vocab']} -> "
          f"{result['target_vocab']}", file=sys.stderr)
    print(row("", names), file=sys.stderr)
    for label, fmt in [
        ("peak RSS (ru_maxrss)", lambda r: f"{r['peak_rss_mb']:.0f} MB"),
        ("  sampled peak anonymous / file-backed", lambda r: f"{r['sampled_peak_anon_mb']:.0f} / "
                                                            f"{r['sampled_peak_file_mb']:.0f} MB"),
        ("  phase of the peak", lambda r: r["peak_phase"]),
        ("  above the startup baseline", lambda r: f"{r['above_baseline_mb']:.0f} MB"),
        ("  streamed estimate: startup + f32 embeddings + tensor", lambda r: f"{r['streamed_estimate_mb']:.0f} MB"),
        ("output checkpoint", lambda r: f"{r['output_bytes'] / gb:.2f} GB"),
        ("peak RSS / output checkpoint", lambda r: f"{r['rss_ratio']:.3f}x"),
        ("shared tokens", lambda r: str(r["shared_tokens"])),
        ("seconds (incl. startup)", lambda r: f"{r['seconds']:.1f}"),
        ("verdict", lambda r: r["verdict"]),
    ]:
        print(row(label, [fmt(runs[n]) for n in names]), file=sys.stderr)
    emb = result["embedding_bytes_f32"]
    for label, value in [
        ("source checkpoint", f"{result['source_checkpoint_bytes'] / gb:.2f} GB"),
        ("largest tensor", f"{result['largest_tensor_bytes'] / MB:.0f} MB ({result['largest_tensor']})"),
        ("largest non-embedding tensor", f"{result['largest_layer_tensor_bytes'] / MB:.0f} MB"),
        ("embeddings in float32, source + target", f"{emb['source'] / MB:.0f} + {emb['target'] / MB:.0f} MB "
                                                    f"(helper {emb['helper'] / MB:.0f} MB)"),
        ("JAX runtime (import clp_jax, jax.devices())", f"{result['runtime_rss_mb']:.0f} MB"),
        ("  + the transfer's imports, config, tokenizers", f"{result['startup_rss_mb']:.0f} MB (torch imported: "
                                                         f"{result['torch_imported']})"),
        ("output shard limit (max_shard_bytes)", f"{result['max_shard_bytes'] / 2**30:.0f} GiB (written to disk "
                                                 "as it streams, not buffered)"),
    ]:
        print(f"  {label:<56}  {value}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--size full needs about 6.5 GB of disk under --work (the 3.1 GB source, kept, and one 3.1 GB output "
               "while a run lasts) and a few minutes; --size small is a few MB and takes about 20 s.")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: GPT-2 XL shapes (default); small: 2 layers, width 128, 4000-token vocab")
    parser.add_argument("--work", default="/tmp/clp-jax-bench-rss",
                        help="dir for the generated inputs (one subdir per size, reused when present) and the "
                             "outputs (deleted after each run); default %(default)s")
    parser.add_argument("--strategies", default="fvt,clp",
                        help="comma-separated transfer strategies to measure (default %(default)s; clp uses the "
                             "helper model)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per transfer run (default %(default)s)")
    args = parser.parse_args()

    keep_jax_off_libtpu("transfer")  # writing the inputs calls jax.process_index(); no TPU probing
    size = SIZES[args.size]
    root = os.path.abspath(os.path.join(args.work, args.size))
    paths = build_inputs(root, size)
    headers = safetensors_headers(paths["source"])
    largest = max(headers, key=lambda k: headers[k][2])
    layer_largest = max(v[2] for k, v in headers.items() if k != "transformer.wte.weight")
    embeddings = {"source": size.vocab * size.width * 4, "target": size.target_vocab * size.width * 4,
                  "helper": size.target_vocab * size.helper_width * 4}

    say("baselines: a process that imports clp_jax and starts JAX, and one that also does the transfer's startup")
    runtime = measure([sys.executable, "-c", RUNTIME_CODE], 300)
    startup = measure([sys.executable, "-c", STARTUP_CODE, paths["source"], paths["target_tokenizer"]], 300)
    runs = {}
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        runs[strategy] = measure_transfer(strategy, paths, size, args.timeout, startup["peak_rss_mb"],
                                          estimate_mb=startup["peak_rss_mb"] + (
                                              embeddings["source"] + embeddings["target"] + headers[largest][2]
                                              + (embeddings["helper"] if strategy != "fvt" else 0)) / MB)

    ok = [r for r in runs.values() if r["output_bytes"]]
    result = {
        "size": args.size, "layers": size.layers, "width": size.width, "source_vocab": size.vocab,
        "target_vocab": size.target_vocab, "params": sum(int(np.prod(v[1])) for v in headers.values()),
        "source_checkpoint_bytes": checkpoint_bytes(paths["source"]), "largest_tensor": largest,
        "largest_tensor_bytes": headers[largest][2], "largest_layer_tensor_bytes": layer_largest,
        "embedding_bytes_f32": embeddings, "runtime_rss_mb": runtime["peak_rss_mb"],
        "startup_rss_mb": startup["peak_rss_mb"],
        "torch_imported": (startup["summary"] or {}).get("torch_imported"), "max_shard_bytes": DEFAULT_MAX_SHARD_BYTES,
        "peak_rss_mb": max((r["peak_rss_mb"] for r in ok), default=None),
        "rss_ratio": max((r["rss_ratio"] for r in ok), default=None),
        "runs": runs,
    }
    table(result)
    print(json.dumps(result))
    if any(r["returncode"] != 0 or r["output_error"] for r in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
