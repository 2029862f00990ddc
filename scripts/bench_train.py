"""Training throughput. Two benchmarks, chosen by ``--backend``:

``cpu`` (default): clp-jax's train step vs transformers' PyTorch GPT2LMHeadModel + torch.optim.AdamW. One
GPT-2-style model (default 6 layers, d=512, 8 heads, seq 256, vocab 8192, batch 8), the same shapes on both
sides, float32, timed in alternating rounds in one process; MFU is measured against the float32 matmul rate
this machine reaches in the same run. Also times the step's matmuls alone (same shapes and transposes, one
jit, nothing else): that floor bounds the speedup any JAX implementation could reach here. The JSON line
has `speedup_vs_pytorch`, `mfu`, `matmul_floor_vs_pytorch`, `floor_fraction` (our tokens/s / the floor's) and
`malloc_kept` (glibc's malloc set to keep freed memory, as `clp-jax train` does on a CPU; `--malloc-defaults`
leaves it alone) with `page_faults_per_step`, the minor faults of our timed steps (near 0 while malloc keeps).

``gpu``: tokens/s and MFU against the chip's vendor bf16 peak (``clp_jax.chips``) of one accelerator, for a
1B-class Llama (``--arch``, default configs/arch/llama-3.2-1b, random weights), bfloat16 compute over
float32 weights, once per ``--attention`` implementation (default cudnn, then xla). ``--tiny`` shrinks the
model and batch so that the same path runs anywhere, e.g. ``--backend gpu --tiny --attention xla`` on a CPU
as a smoke test (no vendor peak there, so no MFU).

Each prints a table to stderr and, last on stdout, one JSON line.

    python scripts/bench_train.py [--layers 6] [--d-model 512] [--seq-len 256] [--batch 8] [--rounds 3]
    python scripts/bench_train.py --backend gpu [--attention cudnn xla] [--batch 8] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import collections
import gc
import gzip
import json
import os
import pathlib
import re
import resource
import statistics
import sys
import time

import jax
import numpy as np

from clp_jax import models
from clp_jax.chips import chip_for_device_kind
from clp_jax.errors import ClpError
from clp_jax.hf.reader import read_config
from clp_jax.host_memory import keep_freed_memory
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

    return state, run, step


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


def profile_step(step, state, batch: dict, out_dir: str, steps: int = 2) -> dict[str, float]:
    """Milliseconds per step in XLA:CPU's thunks (from a ``jax.profiler`` trace written to ``out_dir``): the
    matmuls, and the rest by the part of the model its HLO metadata names."""
    hlo = step.lower(state, batch).compile().as_text()
    bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    kinds = {}
    for name, line in re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo, re.M):
        called = "".join(bodies.get(c, "") for c in re.findall(r"calls=%?([\w.\-]+)", line))
        op = (re.findall(r'op_name="([^"]*)"', line) or [""])[0]
        kinds[name] = "matmuls" if re.search(r" (dot|convolution)\(", line + called) else profile_part(op)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
    trace_file = sorted(pathlib.Path(out_dir).rglob("*perfetto_trace.json.gz"))[-1]
    with gzip.open(trace_file) as f:
        events = json.load(f)
    totals: dict[str, float] = collections.Counter()
    for e in events["traceEvents"] if isinstance(events, dict) else events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            totals[kinds[e["name"]]] += e.get("dur", 0) / 1e3 / steps
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def profile_part(op_name: str) -> str:
    """The part of the step an HLO op's ``op_name`` metadata says it belongs to."""
    if "while/body" in op_name:
        return "loss"
    for part in ("attn_norm", "mlp_norm", "final_norm"):
        if f"/{part}/" in op_name:
            return "norms+residual"
    if "/attn/" in op_name:
        return "attention"
    if "/mlp/" in op_name:
        return "gelu"
    return "model other" if "Transformer" in op_name else "optimizer+other"


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


WARM_ROUNDS = 6


def minor_faults() -> int:
    """This process's minor page faults so far (memory the kernel mapped in)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def compare_cpu(args: argparse.Namespace) -> None:
    """Our step vs PyTorch's and vs the matmul floor on this CPU, float32, GPT-2 shapes."""
    malloc_kept = False if args.malloc_defaults else keep_freed_memory()  # as `clp-jax train` does on a CPU
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = gpt2_config(args)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len), dtype=np.int32)
        batches.append({"tokens": tokens, "segment_ids": np.ones_like(tokens),
                        "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), tokens.shape).copy()})
    state, ours, step = time_ours(cfg, batches, args.steps)
    theirs = time_torch(cfg, batches, args.steps)
    floor = time_matmul_floor(cfg, args.batch, args.seq_len)
    # Untimed rounds of each until malloc's heap holds all three (a round without page faults; at most
    # WARM_ROUNDS): the three programs' buffers interleave in the one kept heap, and a round can split
    # the hole another's big temporary buffer needs, so the heap grows a few times before it stops.
    warm_rounds, warm = 0, False
    while not warm:
        before = minor_faults()
        state = ours(state)[0]
        theirs(None)
        floor()
        warm_rounds += 1
        warm = not malloc_kept or warm_rounds == WARM_ROUNDS or minor_faults() - before < 1000
    ours_t, torch_t, floor_t = [], [], []
    faults = 0  # minor page faults during our timed steps: memory malloc did not keep (host_memory)
    for _ in range(args.rounds):
        before = minor_faults()
        state, t, ours_loss = ours(state)
        faults += minor_faults() - before
        ours_t.append(t)
        _, t, torch_loss = theirs(None)
        torch_t.append(t)
        floor_t.append(min(floor() for _ in range(args.steps)))
    rates = matmul_rates(cfg, args.batch, args.seq_len)
    # The fastest float32 rate seen in this run, warm: a square product or any of the step's products alone.
    peak = max(measure_matmul_flops(2.0, n=2048), *(r * 1e9 for r in rates.values()))
    profile = profile_step(step, state, batches[0], args.profile) if args.profile else None
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
          f"implementation on this XLA build could reach; clp-jax at {ours_tps / floor_tps:.0%} of it",
          file=sys.stderr)
    print("matmul GFLOP/s by kind, each product alone: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()),
          file=sys.stderr)
    if profile:
        print("one step's thunk time (ms, summed over both cores' threads): "
              + ", ".join(f"{k} {v:.1f}" for k, v in profile.items()), file=sys.stderr)
    print(json.dumps({"tokens_per_s": round(ours_tps, 1), "pytorch_tokens_per_s": round(torch_tps, 1),
                      "speedup_vs_pytorch": round(ours_tps / torch_tps, 3), "mfu": round(mfu, 4),
                      "matmul_floor_tokens_per_s": round(floor_tps, 1),
                      "matmul_floor_vs_pytorch": round(floor_tps / torch_tps, 3),
                      "floor_fraction": round(ours_tps / floor_tps, 3),
                      "matmul_gflops_by_kind": {k: round(v, 1) for k, v in rates.items()},
                      "pytorch_mfu": round(torch_mfu, 4), "peak_gflops": round(peak / 1e9, 1),
                      "step_gflop": round(flops / 1e9, 4), "device": jax.devices()[0].device_kind,
                      "layers": cfg.num_layers, "d_model": cfg.hidden_size, "seq_len": args.seq_len,
                      "batch": args.batch, "malloc_kept": malloc_kept,
                      "page_faults_per_step": round(faults / (args.rounds * args.steps)), "warm_rounds": warm_rounds,
                      **({"profile_ms": profile} if profile else {})}))



DEFAULT_ARCH = pathlib.Path(__file__).parents[1] / "configs" / "arch" / "llama-3.2-1b"
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=256)


def accelerator_config(args: argparse.Namespace) -> TransformerConfig:
    """The ``--arch`` model in bfloat16 compute over float32 weights; ``--tiny`` keeps its family, not its size."""
    cfg = read_config(str(args.arch), dtype="bfloat16", param_dtype="float32")
    if args.tiny:
        cfg = cfg.replace(**TINY)
    return cfg.replace(logits_chunk=args.logits_chunk, remat=args.remat)


def time_attention(cfg: TransformerConfig, batch: dict, steps: int, rounds: int) -> list[float]:
    """Seconds per step of ``rounds`` timed runs of ``steps`` steps, after a compile-and-warm-up step."""
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, total_steps=10**6, max_grad_norm=1.0))
    state = create_sharded_state(models.init_params(cfg, jax.random.key(0)), cfg, opt, mesh)
    step = make_train_step(cfg, opt, mesh)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - start) / steps)
    return times


def benchmark_accelerator(args: argparse.Namespace) -> None:
    """Tokens/s and MFU (vs the vendor bf16 peak) of one chip for each ``--attention`` implementation."""
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.tiny:
        raise ClpError(f"--backend gpu: JAX sees no GPU (its device is {device.device_kind!r}); run on a GPU "
                       "host, or add --tiny for a smoke test of this path")
    cfg = accelerator_config(args)
    batch_rows, seq_len = args.batch or (2 if args.tiny else 8), args.seq_len or (64 if args.tiny else 2048)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_rows, seq_len), dtype=np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()}
    chip = chip_for_device_kind(device.device_kind)
    peak = chip.peak_flops if chip else None
    flops = train_step_flops(cfg, batch_rows * seq_len, seq_len)
    results = {}
    for impl in args.attention:
        try:
            times = time_attention(cfg.replace(attention=impl), batch, args.steps, args.rounds)
        except Exception as e:  # an implementation this chip or model cannot run (or OOM) must not hide the others
            results[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        finally:
            gc.collect()
        seconds = statistics.median(times)
        results[impl] = {"tokens_per_s": round(batch_rows * seq_len / seconds, 1), "step_s": round(seconds, 4),
                         "tflops_per_s": round(flops / seconds / 1e12, 2),
                         "mfu": None if peak is None else round(flops / seconds / peak, 4)}
    print(f"model: {args.arch.name}{' (tiny)' if args.tiny else ''}, {cfg.num_params() / 1e6:.1f}M params, "
          f"batch {batch_rows} x seq {seq_len}, bf16 compute; {device.device_kind}, vendor bf16 peak "
          f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}", file=sys.stderr)
    print(f"{'attention':10s} {'tokens/s':>10s} {'step s':>8s} {'TFLOP/s':>8s} {'MFU':>7s}", file=sys.stderr)
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:10s} failed: {r['error']}", file=sys.stderr)
            continue
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{impl:10s} {r['tokens_per_s']:10.0f} {r['step_s']:8.3f} {r['tflops_per_s']:8.1f} {mfu:>7s}",
              file=sys.stderr)
    print(json.dumps({"backend": "gpu", "device": device.device_kind, "arch": args.arch.name, "tiny": args.tiny,
                      "params": cfg.num_params(), "batch": batch_rows, "seq_len": seq_len,
                      "step_gflop": round(flops / 1e9, 3), "peak_tflops": None if peak is None else peak / 1e12,
                      "attention": results}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--layers", type=int, default=6, help="cpu: GPT-2 depth")
    p.add_argument("--d-model", type=int, default=512, help="cpu: GPT-2 width")
    p.add_argument("--heads", type=int, default=8, help="cpu: GPT-2 heads")
    p.add_argument("--vocab", type=int, default=8192, help="cpu: GPT-2 vocabulary")
    p.add_argument("--seq-len", type=int, default=None, help="default 256 (cpu), 2048 (gpu), 64 (gpu --tiny)")
    p.add_argument("--batch", type=int, default=None, help="rows per step; default 8 (2 with --tiny)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--arch", type=pathlib.Path, default=DEFAULT_ARCH, help="gpu: config.json dir of the model")
    p.add_argument("--attention", nargs="+", default=["cudnn", "xla"], help="gpu: implementations to time")
    p.add_argument("--tiny", action="store_true", help="gpu: a 2-layer, width-64 model of --arch's family")
    p.add_argument("--logits-chunk", type=int, default=None, help="gpu: model.logits_chunk (None: all)")
    p.add_argument("--remat", default="none", help="gpu: model.remat policy")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="cpu: leave glibc's malloc as it is (by default it keeps freed memory, as `clp-jax train` "
                        "does on a CPU: clp_jax.host_memory)")
    p.add_argument("--profile", metavar="DIR", help="cpu: also trace two steps into DIR and print where the time goes")
    args = p.parse_args()
    try:
        if args.backend == "gpu":
            benchmark_accelerator(args)
        else:
            args.batch, args.seq_len = args.batch or 8, args.seq_len or 256
            compare_cpu(args)
    except ClpError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
