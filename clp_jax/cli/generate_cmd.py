"""`clp-jax generate`: completions of text prompts from a Hugging Face model dir, for people to read."""

from __future__ import annotations

import argparse
import math
import time

from clp_jax.cli.common import positive, print_result
from clp_jax.errors import ClpError


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate", parents=parents, help="complete text prompts with an HF model dir (greedy or sampled)",
        description="Complete one or more prompts with a Hugging Face model dir: batched, KV-cached and "
                    "jit-compiled, stopping at EOS (the tokenizer's and generation_config.json's). Prints each "
                    "completion, then one JSON line with the completions and tokens_per_s (compilation "
                    "included).")
    p.add_argument("--model", required=True, help="HF model dir (config.json, weights, tokenizer files)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat", action="store_true",
                   help="format prompts as in SFT: the chat template with its generation prompt, else prompt + "
                        "newline")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--fsdp", type=int, default=1, help="mesh fsdp size (default 1; data takes the other devices)")
    p.add_argument("--tensor", type=int, default=1, help="mesh tensor size (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clp_jax.hf.reader import eos_ids, load_params, read_config
    from clp_jax.hf.tokenizer import check_tokenizer_fits, load_tokenizer
    from clp_jax.posttrain.generate import encode_prompts, generate, pad_token_id
    from clp_jax.sharding import make_mesh

    positive("--max-new-tokens", args.max_new_tokens)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ClpError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None:
        positive("--top-k", args.top_k)
    cfg = read_config(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    check_tokenizer_fits(tokenizer, cfg.vocab_size, args.model)
    prompt_ids = encode_prompts(tokenizer, args.prompt, chat=args.chat)
    mesh = make_mesh(data=-1, fsdp=args.fsdp, tensor=args.tensor)
    cfg, params = load_params(args.model, mesh, cfg, progress=False)
    start = time.perf_counter()
    ids = generate(params, cfg, prompt_ids, max_new_tokens=args.max_new_tokens, eos_id=eos_ids(args.model, tokenizer),
                   pad_id=pad_token_id(tokenizer), temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   mesh=mesh)
    seconds = time.perf_counter() - start
    completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
    for i, (prompt, completion) in enumerate(zip(args.prompt, completions), 1):
        print(f"=== [{i}] {prompt}\n{completion}\n", flush=True)
    tokens = sum(len(row) for row in ids)
    print_result({"completions": completions, "tokens": tokens, "seconds": round(seconds, 3),
                  "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None})
    return 0
