"""Training throughput: clp-jax's train step vs transformers' PyTorch GPT2LMHeadModel + torch.optim.AdamW.

One GPT-2-style model (default 6 layers, d=512, 8 heads, seq 256, vocab 8192, batch 8), the same shapes
on both sides, float32, timed in alternating rounds in one process; MFU is measured against the float32
matmul rate this machine reaches in the same run. Also times the step's matmuls alone (same shapes and
transposes, one jit, nothing else): that floor bounds the speedup any JAX implementation could reach here.
Prints a table to stderr and, last on stdout, one JSON line with `speedup_vs_pytorch`, `mfu` and
`matmul_floor_vs_pytorch`.

    python scripts/bench_train.py [--layers 6] [--d-model 512] [--seq-len 256] [--batch 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from clp_jax import models
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import make_mesh
from clp_jax.train.flops import train_step_flops
from clp_jax.train.optimizer import OptimizerConfig, make_optimizer
from clp_jax.train.run_log import measure_matmul_flops
from clp_jax.train.state import create_sharded_state
from clp_jax.train.step import make_train_step


def gpt2_config(args: argparse.Namespace) -> TransformerConfig:
    return TransformerConfig(arch="gpt2", vocab_size=args.vocab, hidden_size=args.d_model, num_layers=args.layers,
                             num_heads=args.heads, num_kv_heads=args.heads, head_dim=args.d_model // args.heads,
                             intermediate_size=4 * args.d_model, norm="layernorm", norm_eps=1e-5,
                             activation="gelu_tanh", gated_mlp=False, position="learned",
                             max_position_embeddings=args.seq_len, qkv_bias=True, out_bias=True, mlp_bias=True)


def time_ours(cfg: TransformerConfig, batches: list[dict], steps: int) -> tuple:
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, total_steps=10**6, max_grad_norm=1.0,
                                         weight_decay=0.1))
    state = create_sharded_state(models.init_params(cfg, jax.random.key(0)), cfg, opt, mesh)
    step = make_train_step(cfg, opt, mesh)
    state, m = step(state, batches[0])  # compile
    jax.block_until_ready(m)

    def run(state):
        start = time.perf_counter()
        for i in range(steps):
            state, m = step(state, batches[i % len(batches)])
        jax.block_until_ready(m)
        return state, time.perf_counter() - start, float(m["loss"])

    return state, run


def step_matmuls(cfg: TransformerConfig, batch: int, seq_len: int) -> list[tuple]:
    """(lhs shape, rhs shape, dimension numbers) of every matmul in one training step, forward and backward.

    Each dense layer x[N,K] @ W[K,O] contributes x @ W, dy @ W^T and x^T @ dy; the tied output layer the same
    against the [V, E] table; attention per layer QK^T and PV forward and four batched products backward.
    """
    n, e, m, v = batch * seq_len, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    bh, t, d = batch * cfg.num_heads, seq_len, cfg.head_dim
    nn_, nt, tn = (((1,), (0,)), ((), ())), (((1,), (1,)), ((), ())), (((0,), (0,)), ((), ()))
    out = []
    for k, o in [(e, e)] * 4 + [(e, m), (m, e)]:
        out += [((n, k), (k, o), nn_), ((n, o), (k, o), nt), ((n, k), (n, o), tn)]
    out = out * cfg.num_layers
    out += [((n, e), (v, e), nt), ((n, v), (v, e), nn_), ((n, v), (n, e), tn)]
    batched = lambda lc, rc: (((lc,), (rc,)), ((0,), (0,)))  # noqa: E731
    attention = [((bh, t, d), (bh, t, d), batched(2, 2)),  # scores = Q K^T
                 ((bh, t, t), (bh, t, d), batched(2, 1)),  # out = P V
                 ((bh, t, t), (bh, t, d), batched(1, 1)),  # dV = P^T dO
                 ((bh, t, d), (bh, t, d), batched(2, 2)),  # dP = dO V^T
                 ((bh, t, t), (bh, t, d), batched(2, 1)),  # dQ = dS K
                 ((bh, t, t), (bh, t, d), batched(1, 1))]  # dK = dS^T Q
    return out + attention * cfg.num_layers


def time_matmul_floor(cfg: TransformerConfig, batch: int, seq_len: int):
    """Seconds for only the matmuls of one step, all in one jit: no implementation on this XLA can be faster."""
    products = step_matmuls(cfg, batch, seq_len)
    rng = np.random.default_rng(0)
    operands = [random_operands(rng, a, b) for a, b, _ in products]
    fn = jax.jit(lambda ops: [jax.lax.dot_general(x, y, dims) for (x, y), (_, _, dims) in zip(ops, products)])
    jax.block_until_ready(fn(operands))

    def seconds() -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn(operands))
        return time.perf_counter() - start

    return seconds


def random_operands(rng: np.random.Generator, *shapes: tuple) -> tuple:
    return tuple(jax.numpy.asarray(rng.standard_normal(s, np.float32)) for s in shapes)


def matmul_kind(dims: tuple) -> str:
    """'batched', '2d_tn' (contracting the row dim of both operands, as weight gradients do) or '2d_nn_nt'."""
    (lc, _), (lb, _) = dims
    return "batched" if lb else "2d_tn" if lc == (0,) else "2d_nn_nt"


def matmul_rates(cfg: TransformerConfig, batch: int, seq_len: int, reps: int = 5) -> dict[str, float]:
    """GFLOP/s per kind of the step's matmuls, each distinct product timed alone (best of ``reps``)."""
    flops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for (a, b, dims), n in collections.Counter(step_matmuls(cfg, batch, seq_len)).items():
        x, y = random_operands(rng, a, b)
        fn = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims))
        out = jax.block_until_ready(fn(x, y))
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn(x, y))
            best = min(best, time.perf_counter() - start)
        kind = matmul_kind(dims)
        contracted = int(np.prod([a[i] for i in dims[0][0]]))
        flops[kind] = flops.get(kind, 0.0) + n * 2.0 * out.size * contracted
        seconds[kind] = seconds.get(kind, 0.0) + n * best
    return {k: flops[k] / seconds[k] / 1e9 for k in sorted(flops)}


def time_torch(cfg: TransformerConfig, batches: list[dict], steps: int):
    import torch
    import transformers

    hf = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                                 n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings,
                                 attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(hf).train()
    model.config.use_cache = False
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4)
    data = [torch.as_tensor(b["tokens"].astype(np.int64)) for b in batches]

    def one(ids):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    one(data[0])

    def run(_):
        start = time.perf_counter()
        for i in range(steps):
            loss = one(data[i % len(data)])
        return None, time.perf_counter() - start, float(loss)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = gpt2_config(args)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len), dtype=np.int32)
        batches.append({"tokens": tokens, "segment_ids": np.ones_like(tokens),
                        "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), tokens.shape).copy()})
    peak = measure_matmul_flops(2.0, n=2048)
    state, ours = time_ours(cfg, batches, args.steps)
    theirs = time_torch(cfg, batches, args.steps)
    floor = time_matmul_floor(cfg, args.batch, args.seq_len)
    ours_t, torch_t, floor_t = [], [], []
    for _ in range(args.rounds):
        state, t, ours_loss = ours(state)
        ours_t.append(t)
        _, t, torch_loss = theirs(None)
        torch_t.append(t)
        floor_t.append(min(floor() for _ in range(args.steps)))
    rates = matmul_rates(cfg, args.batch, args.seq_len)
    tokens = args.batch * args.seq_len * args.steps
    ours_tps, torch_tps = tokens / statistics.median(ours_t), tokens / statistics.median(torch_t)
    floor_tps = args.batch * args.seq_len / statistics.median(floor_t)
    flops = train_step_flops(cfg, args.batch * args.seq_len, args.seq_len)
    mfu = ours_tps / (args.batch * args.seq_len) * flops / peak
    torch_mfu = torch_tps / (args.batch * args.seq_len) * flops / peak
    print(f"model: {cfg.num_layers} layers, d={cfg.hidden_size}, seq {args.seq_len}, batch {args.batch}, "
          f"{cfg.num_params() / 1e6:.1f}M params; {jax.devices()[0].device_kind}, {os.cpu_count()} cores",
          file=sys.stderr)
    print(f"matmul peak (float32, measured): {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)
    print(f"clp-jax : {ours_tps:9.0f} tokens/s  MFU {mfu:6.1%}  (loss {ours_loss:.3f})", file=sys.stderr)
    print(f"pytorch : {torch_tps:9.0f} tokens/s  MFU {torch_mfu:6.1%}  (loss {torch_loss:.3f})", file=sys.stderr)
    print(f"matmuls only (floor): {floor_tps:9.0f} tokens/s = {floor_tps / torch_tps:.2f}x pytorch, the most any "
          f"implementation on this XLA build could reach", file=sys.stderr)
    print("matmul GFLOP/s by kind, each product alone: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()),
          file=sys.stderr)
    print(json.dumps({"tokens_per_s": round(ours_tps, 1), "pytorch_tokens_per_s": round(torch_tps, 1),
                      "speedup_vs_pytorch": round(ours_tps / torch_tps, 3), "mfu": round(mfu, 4),
                      "matmul_floor_tokens_per_s": round(floor_tps, 1),
                      "matmul_floor_vs_pytorch": round(floor_tps / torch_tps, 3),
                      "matmul_gflops_by_kind": {k: round(v, 1) for k, v in rates.items()},
                      "pytorch_mfu": round(torch_mfu, 4), "peak_gflops": round(peak / 1e9, 1),
                      "step_gflop": round(flops / 1e9, 2), "device": jax.devices()[0].device_kind,
                      "layers": cfg.num_layers, "d_model": cfg.hidden_size, "seq_len": args.seq_len,
                      "batch": args.batch}))


if __name__ == "__main__":
    main()
