"""Check `clp-jax eval` against transformers' PyTorch loss on any local HF checkpoint (needs torch).

    python scripts/compare_with_transformers.py --model DIR --data FILE [--seq-len N]
    python scripts/compare_with_transformers.py --train-gpt2 DIR --steps 300   # make a trained model first

With no checkpoint at hand (no model hub here), ``--train-gpt2`` trains a small GPT-2 with PyTorch on the
demo corpus so the comparison runs on trained, not random, weights. The last stdout line is JSON with
both losses and their relative difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

# torch, transformers and clp_jax are imported where they are used, so that --help answers at once.


def torch_loss(model_dir: str, docs: list[np.ndarray]) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.as_tensor(d[None].astype(np.int64))
            total += model(input_ids=ids, labels=ids).loss.double().item() * (len(d) - 1)
            count += len(d) - 1
    return total / count


def train_gpt2(out: str, steps: int, seed: int = 0) -> None:
    """A small GPT-2 trained with PyTorch AdamW on the English demo corpus, saved as an HF dir."""
    import torch
    import transformers

    from clp_jax.data.demo_corpus import demo_texts
    from clp_jax.demo import train_tokenizer

    torch.manual_seed(seed)
    texts = demo_texts("en")
    tok = train_tokenizer(texts, 1024)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    data = torch.as_tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f}", file=sys.stderr)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model dir to check")
    p.add_argument("--data", help="text file, one document per line (default: English demo corpus)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--train-gpt2", metavar="DIR", help="first train a small GPT-2 with PyTorch into DIR")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    from clp_jax.data.demo_corpus import demo_texts
    from clp_jax.eval.perplexity import encode_documents, perplexity
    from clp_jax.files import read_lines
    from clp_jax.hf.reader import load_params, read_config
    from clp_jax.hf.tokenizer import load_tokenizer
    from clp_jax.sharding import make_mesh

    model_dir = args.model or args.train_gpt2 or os.path.join(tempfile.mkdtemp(), "gpt2")
    if args.train_gpt2 or not args.model:
        train_gpt2(model_dir, args.steps)
    texts = read_lines(args.data) if args.data else demo_texts("en")[::7]
    tok = load_tokenizer(model_dir)
    cfg = read_config(model_dir)
    seq_len = min(args.seq_len, cfg.max_position_embeddings) if cfg.position == "learned" else args.seq_len
    docs, _, skipped = encode_documents(tok, texts, seq_len)
    mesh = make_mesh(data=-1)
    cfg, params = load_params(model_dir, mesh, cfg)
    ours = perplexity(params, cfg, mesh, docs, seq_len=seq_len, skipped=skipped).loss
    ref = torch_loss(model_dir, docs)
    print(json.dumps({"model": model_dir, "documents": len(docs), "clp_jax_loss": ours, "transformers_loss": ref,
                      "relative_difference": abs(ours - ref) / ref}))


if __name__ == "__main__":
    main()
