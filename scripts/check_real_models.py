"""Check `clp-jax convert` on the real GGUF models of the registry against transformers' own GGUF loading.

For each model (fetched with `clp-jax fetch NAME --keep-gguf`) and each language of held-out Wikipedia
summaries (`clp-jax fetch wiki-LANG`, the last --docs lines): `clp-jax eval`'s loss and bits per byte on the
converted HF dir, and transformers' PyTorch model loaded straight from the GGUF (float32) on the same
documents, with the token ids of both tokenizers compared document by document. Results are kept in
--out/results.json per (model, language, settings), so a rerun resumes. Prints a table on stderr and one
JSON line last. Needs torch (a test dependency) for the transformers side.

    python scripts/check_real_models.py [--models smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b] [--docs 64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
LANGS = ("en", "fr", "es")


def held_out(text_file: str, n: int) -> list[str]:
    """The last ``n`` non-empty lines: the held-out split of `clp-jax study transfer` and the demo."""
    from clp_jax.files import read_lines
    from clp_jax.transfer.study import split_held_out

    return split_held_out(read_lines(text_file), None, n, text_file)[1]


def ours(model_dir: str, texts: list[str], seq_len: int, batch_size: int) -> dict:
    """`clp-jax eval` on the converted dir, through the library."""
    from clp_jax.eval.perplexity import encode_documents, perplexity
    from clp_jax.hf.reader import load_params, read_config
    from clp_jax.hf.tokenizer import load_tokenizer
    from clp_jax.sharding import MeshConfig, mesh_from_config

    start = time.perf_counter()
    tok = load_tokenizer(model_dir)
    docs, covered, skipped = encode_documents(tok, texts, seq_len)
    mesh = mesh_from_config(MeshConfig())
    cfg, params = load_params(model_dir, mesh, read_config(model_dir), progress=False)
    result = perplexity(params, cfg, mesh, docs, batch_size=batch_size, seq_len=seq_len, skipped=skipped,
                        covered_bytes=covered, progress=False).to_dict()
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result, docs


def reference(entry_dir: str, gguf_file: str, texts: list[str], our_docs: list[np.ndarray], seq_len: int,
              batch_size: int) -> dict:
    """transformers' PyTorch model and tokenizer loaded from the GGUF itself, float32, on the same texts."""
    import torch
    import transformers

    start = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(entry_dir, gguf_file=gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(entry_dir, gguf_file=gguf_file,
                                                              dtype=torch.float32).eval()
    ids = [np.asarray(x[:seq_len]) for x in tok([t for t in texts if t.strip()])["input_ids"]]
    ids = [x for x in ids if len(x) >= 2]
    same = len(ids) == len(our_docs) and all(np.array_equal(a, b) for a, b in zip(ids, our_docs))
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(our_docs), batch_size):
            batch = our_docs[i:i + batch_size]
            t = max(len(d) for d in batch)
            x = np.zeros((len(batch), t), np.int64)
            mask = np.zeros((len(batch), t), np.int64)
            for r, d in enumerate(batch):
                x[r, :len(d)], mask[r, :len(d)] = d, 1
            logits = model(input_ids=torch.as_tensor(x), attention_mask=torch.as_tensor(mask)).logits.double()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, torch.as_tensor(x[:, 1:])[..., None])[..., 0]
            weights = torch.as_tensor(mask[:, 1:], dtype=torch.float64)
            nll -= float((picked * weights).sum())
            count += int(weights.sum())
    return {"loss": nll / count, "tokens": count, "token_ids_equal": same,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--langs", default=",".join(LANGS))
    p.add_argument("--docs", type=int, default=64, help="held-out documents per language (the last lines)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cache", help="clp-jax fetch cache (default $CLP_JAX_CACHE or ~/.cache/clp-jax)")
    p.add_argument("--out", default="runs/real_models")
    p.add_argument("--no-reference", action="store_true", help="skip transformers (no torch needed)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clp_jax.fetch import fetch, read_manifest
    from clp_jax.files import write_json

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path, encoding="utf-8")) if os.path.exists(results_path) else {}
    texts = {lang: held_out(fetch(f"wiki-{lang}", args.cache), args.docs) for lang in args.langs.split(",")}
    for name in args.models.split(","):
        model_dir = fetch(name, args.cache, keep_gguf=not args.no_reference)
        entry = os.path.dirname(model_dir)
        manifest = read_manifest(name, os.path.dirname(entry))
        for lang, docs in texts.items():
            key = f"{name}/{lang}/docs={args.docs}/seq={args.seq_len}"
            if key in results and ("reference" in results[key] or args.no_reference):
                continue
            print(f"{key}: clp-jax eval ...", file=sys.stderr, flush=True)
            mine, our_docs = ours(model_dir, docs, args.seq_len, args.batch_size)
            row = {"model": name, "language": lang, "ours": mine}
            if not args.no_reference:
                print(f"{key}: transformers from the GGUF ...", file=sys.stderr, flush=True)
                ref = reference(entry, manifest["gguf"]["file"], docs, our_docs, args.seq_len, args.batch_size)
                ref["relative_difference"] = abs(mine["loss"] - ref["loss"]) / ref["loss"]
                row["reference"] = ref
            results[key] = row
            write_json(results_path, results)
    rows = [r for k, r in results.items() if k.endswith(f"/docs={args.docs}/seq={args.seq_len}")]
    print(f"{'model':<20} {'lang':<4} {'loss':>7} {'bpb':>6} {'hf loss':>8} {'rel diff':>9} ids", file=sys.stderr)
    for r in rows:
        ref = r.get("reference", {})
        print(f"{r['model']:<20} {r['language']:<4} {r['ours']['loss']:7.4f} {r['ours']['bits_per_byte']:6.3f} "
              f"{ref.get('loss', math.nan):8.4f} {ref.get('relative_difference', math.nan):9.1e} "
              f"{ref.get('token_ids_equal', '-')}", file=sys.stderr)
    worst = max((r["reference"]["relative_difference"] for r in rows if "reference" in r), default=None)
    print(json.dumps({"rows": [{"model": r["model"], "language": r["language"], "loss": round(r["ours"]["loss"], 5),
                                "bits_per_byte": round(r["ours"]["bits_per_byte"], 4),
                                "reference_loss": round(r["reference"]["loss"], 5) if "reference" in r else None,
                                "token_ids_equal": r.get("reference", {}).get("token_ids_equal")} for r in rows],
                      "max_relative_difference": worst}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
