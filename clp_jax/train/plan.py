"""Plan a training run for a TPU slice from any host: compile the train step ahead of time, report per-chip HBM.

libtpu (``pip install "jax[tpu]"``) describes a topology such as ``v5e:16x16`` as compile-only devices, with no
TPU attached. The run's mesh is laid over them, the train step is lowered with the abstract state and batch
(``jax.ShapeDtypeStruct`` with shardings; no weights or data are read) and compiled by XLA:TPU, whose memory
analysis gives the per-chip footprint. Parameters and optimizer state per chip are counted from the shards'
shapes; activations and other temporaries are XLA's temp buffers. FLOPs per step come from ``train_step_flops``
(the MFU convention) and from XLA's cost analysis; tokens/s at an MFU is ``mfu * chips * peak / flops_per_token``.
``plan_search`` compiles candidate attention implementations x remat policies (x logits chunks) and picks the one
with the fewest XLA FLOPs (recomputation included) that fits with the asked headroom; by default the candidates
use the fused kernel where the model allows one, since FLOPs do not see the [T, T] scores xla attention moves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from clp_jax.chips import CHIPS as ALL_CHIPS
from clp_jax.chips import GIB, TPU_GENERATIONS, Chip, host_has_tpu, libtpu_installed
from clp_jax.errors import ClpError
from clp_jax.models import attention
from clp_jax.models.config import TransformerConfig
from clp_jax.models.transformer import REMAT_SAVES
from clp_jax.sharding import batch_sharding, make_mesh
from clp_jax.train.config import TrainConfig, model_config
from clp_jax.train.flops import train_step_flops
from clp_jax.train.optimizer import make_optimizer
from clp_jax.train.state import abstract_state
from clp_jax.train.step import check_batch_shape, make_train_step

CHIPS: dict[str, Chip] = {g: ALL_CHIPS[g] for g in TPU_GENERATIONS}  # the TPU rows of the one chip table
TOPOLOGY_EXAMPLES = ("v5e:2x2", "v5e:16x16", "v4:2x2x2", "v4:4x4x8", "v5p:4x4x4", "v6e:8x8")
# What libtpu looks up about the TPU attached to this host when it loads; on a host without one it logs errors.
_STANDALONE_HOST_ENV = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1",
                        "TPU_CHIPS_PER_HOST_BOUNDS": "2,2,1"}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):([1-9][0-9]*(?:x[1-9][0-9]*){1,2})$")
# XLA:TPU's out-of-memory messages; the number is the whole per-chip requirement, arguments included.
_XLA_OOM = (re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available HBM"),
            re.compile(r"Used ([0-9.]+)([KMGT]?) of [0-9.]+[KMGT]? hbm"))


@dataclasses.dataclass
class PlanReport:
    """Per-chip bytes, fit and throughput of one training config on one TPU topology."""

    topology: str
    device_kind: str
    chips: int
    mesh: dict[str, int]
    hbm_bytes: int
    param_bytes: int  # per chip, from the shards of the parameters
    opt_state_bytes: int  # per chip, from the shards of the optimizer state
    batch_bytes: int  # per chip, the input batch
    temp_bytes: int  # per chip, XLA's temporaries: activations, gradients, logits, collectives' buffers
    code_bytes: int  # per chip, the compiled program
    total_bytes: int  # per chip: arguments + outputs not aliased to them + temporaries + code
    fits: bool
    headroom_bytes: int  # hbm - total (negative when it does not fit)
    tokens_per_step: int
    flops_per_step: float  # train_step_flops: model FLOPs, the MFU convention
    # XLA's cost analysis x chips x grad_accum_steps (it counts a loop body once); remat recomputation included
    xla_flops_per_step: float | None
    mfu: float
    peak_flops_per_chip: float
    tokens_per_s: float  # at `mfu`
    step_seconds: float  # at `mfu`
    compile_seconds: float
    # FLOPs XLA's cost analysis cannot see: Splash kernels' matmuls (``attention.splash_train_flops``) and the
    # chunked loss's loop iterations after the first (``chunked_loss_flops``)
    kernel_flops_per_step: float = 0.0
    attention: str = "xla"  # the implementation the step was compiled with (what auto meant here)
    remat: str = "none"
    logits_chunk: int | None = None
    xla_error: str | None = None  # XLA's out-of-memory message when the program cannot be laid out in HBM
    # XLA's cost analysis: bytes its ops read and write per chip per step (x grad_accum_steps), the HBM
    # traffic FLOPs do not show (xla attention's [T, T] scores; a Pallas kernel counts only its operands)
    xla_bytes_accessed_per_chip: float | None = None
    hbm_bandwidth: float = 0.0  # bytes/s per chip

    @property
    def step_flops(self) -> float | None:
        """FLOPs the compiled step runs, recomputation included: XLA's count plus the kernels' it cannot see."""
        return None if self.xla_flops_per_step is None else self.xla_flops_per_step + self.kernel_flops_per_step

    @property
    def peak_step_seconds(self) -> float | None:
        """Seconds per step if every chip ran ``step_flops`` at its bf16 peak."""
        return None if self.step_flops is None else self.step_flops / (self.chips * self.peak_flops_per_chip)

    @property
    def hbm_step_seconds(self) -> float | None:
        """Seconds per step if each chip moved ``xla_bytes_accessed_per_chip`` at its HBM bandwidth."""
        if self.xla_bytes_accessed_per_chip is None or not self.hbm_bandwidth:
            return None
        return self.xla_bytes_accessed_per_chip / self.hbm_bandwidth

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(total_gib=self.total_bytes / GIB, hbm_gib=self.hbm_bytes / GIB, step_flops=self.step_flops,
                   peak_step_seconds=self.peak_step_seconds, hbm_step_seconds=self.hbm_step_seconds)
        return out

    def format_table(self) -> str:
        """A readable summary, one quantity per line."""
        gib = lambda b: f"{b / GIB:9.2f} GiB"  # noqa: E731
        xla = "n/a" if self.xla_flops_per_step is None else f"{self.xla_flops_per_step:.4g}"
        if self.kernel_flops_per_step:
            xla += f" + {self.kernel_flops_per_step:.4g} XLA cannot count (Splash kernels, loss chunks)"
        peak = "n/a" if self.peak_step_seconds is None else f"{self.peak_step_seconds:.3g} s"
        hbm = ("n/a" if self.hbm_step_seconds is None else f"{self.xla_bytes_accessed_per_chip / GIB:.1f} GiB per "
               f"chip per step (XLA's count): {self.hbm_step_seconds:.3g} s at {self.hbm_bandwidth / 1e9:.0f} GB/s")
        verdict = (f"FITS with {self.headroom_bytes / GIB:.2f} GiB headroom" if self.fits
                   else f"DOES NOT FIT: {-self.headroom_bytes / GIB:.2f} GiB over")
        lines = [
            f"topology          {self.topology}: {self.chips} x {self.device_kind}, mesh "
            + " ".join(f"{k}={v}" for k, v in self.mesh.items()),
            f"model             attention={self.attention} remat={self.remat} logits_chunk={self.logits_chunk}",
            "per chip:",
            f"  parameters      {gib(self.param_bytes)}",
            f"  optimizer state {gib(self.opt_state_bytes)}",
            f"  batch           {gib(self.batch_bytes)}",
            f"  temporaries     {gib(self.temp_bytes)}  (activations, gradients, logits)",
            f"  program         {gib(self.code_bytes)}",
            f"  total           {gib(self.total_bytes)}  of {self.hbm_bytes / GIB:.2f} GiB HBM: {verdict}",
            f"tokens per step   {self.tokens_per_step:,}",
            f"FLOPs per step    {self.flops_per_step:.4g} (model), {xla} (XLA, with recomputation; {peak} per "
            "step at peak)",
            f"HBM traffic       {hbm}",
            f"at MFU {self.mfu:.0%}        {self.tokens_per_s:,.0f} tokens/s, {self.step_seconds:.3g} s/step "
            f"({self.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16 peak per chip)",
            f"compile           {self.compile_seconds:.1f} s",
        ]
        if self.xla_error:
            lines.append(f"XLA               {self.xla_error}")
        return "\n".join(lines)


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """(generation, chip grid) of a topology name like ``v5e:16x16``; a ClpError lists examples otherwise."""
    m = _TOPOLOGY.match(name.strip().lower())
    if m is None:
        raise ClpError(f"unknown TPU topology {name!r}; expected GENERATION:AxB[xC] with generation one of "
                       f"{', '.join(CHIPS)}, e.g. {', '.join(TOPOLOGY_EXAMPLES)}")
    return m.group(1), tuple(int(d) for d in m.group(2).split("x"))


@contextlib.contextmanager
def _quiet_libtpu_load() -> Iterator[None]:
    """While libtpu loads on a host without TPUs, describe the host to it so it does not log errors."""
    if host_has_tpu() or any(k in os.environ for k in (*_STANDALONE_HOST_ENV, "TPU_ACCELERATOR_TYPE")):
        yield
        return
    os.environ.update(_STANDALONE_HOST_ENV)
    try:
        yield
    finally:
        for k in _STANDALONE_HOST_ENV:
            os.environ.pop(k, None)


def tpu_devices(topology: str) -> tuple[Chip, list[jax.Device]]:
    """The chip spec and libtpu's compile-only devices (one per chip) of ``topology``; no TPU needed."""
    generation, _ = parse_topology(topology)
    chip = CHIPS[generation]
    if not libtpu_installed():
        raise ClpError(f'planning for a TPU topology needs libtpu: pip install "jax[tpu]=={jax.__version__}"')
    # Compile-only: do not take libtpu's one-process-per-host lock from a concurrent run on this host.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
    try:
        with _quiet_libtpu_load():
            desc = topologies.get_topology_desc(topology_name=topology.strip().lower(), platform="tpu", **kwargs)
    except (RuntimeError, jax.errors.JaxRuntimeError) as e:
        raise ClpError(f"libtpu cannot describe topology {topology!r}: {str(e).splitlines()[0]}") from None
    return chip, list(desc.devices)


def abstract_batch(cfg: TrainConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch as sharded ShapeDtypeStructs (SFT adds float32 ``loss_weights``)."""
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    sharding = batch_sharding(mesh, shape)
    dtypes = {"tokens": np.int32, "segment_ids": np.int32, "positions": np.int32}
    if cfg.data.mode == "sft":
        dtypes["loss_weights"] = np.float32
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = leaf.sharding
        shape = sharding.shard_shape(leaf.shape) if isinstance(sharding, NamedSharding) else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _xla_oom_bytes(message: str) -> int | None:
    """The per-chip bytes XLA:TPU's out-of-memory message says the program needs, if it is one."""
    m = next((m for m in (p.search(message) for p in _XLA_OOM) if m), None)
    if m is None:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": GIB, "T": 2**40}[m.group(2)])


def _xla_costs(compiled: Any) -> tuple[float | None, float | None]:
    """Per-chip FLOPs and bytes accessed from XLA's cost analysis (None where it has no count)."""
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):
        costs = costs[0] if costs else None
    counts = [(costs or {}).get(key) for key in ("flops", "bytes accessed")]
    return tuple(float(c) if c is not None and c >= 0 else None for c in counts)


def compile_for_memory(step: Any, state: Any, batch: Any) -> dict[str, Any]:
    """Compile ``step`` for its devices: per-chip ``total``, ``temp`` and ``code`` bytes, per-chip ``flops``,
    ``bytes`` accessed and ``error``, XLA's message when the program does not fit in HBM (``total`` is then
    XLA's requirement)."""
    try:
        compiled = step.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        needed = _xla_oom_bytes(str(e))
        if needed is None:
            raise
        temp = max(needed - bytes_per_device((state, batch)), 0)
        return {"total": needed, "temp": temp, "code": 0, "flops": None, "bytes": None,
                "error": str(e).strip().splitlines()[0]}
    mem = compiled.memory_analysis()
    temp, code = int(mem.temp_size_in_bytes), int(mem.generated_code_size_in_bytes)
    total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) + temp + code
    flops, accessed = _xla_costs(compiled)
    return {"total": total, "temp": temp, "code": code, "flops": flops, "bytes": accessed, "error": None}


def chunked_loss_flops(cfg: TransformerConfig, rows: int, seq_len: int) -> float:
    """The output layer's matmul FLOPs (logits, d hidden, d table) in every chunk of ``model.logits_chunk`` but
    the first: the loss loops over chunks, and XLA's cost analysis counts a loop's body once."""
    if cfg.logits_chunk is None or cfg.logits_chunk >= seq_len:
        return 0.0
    n = -(-seq_len // cfg.logits_chunk)
    return (n - 1) * 6.0 * rows * cfg.logits_chunk * cfg.vocab_size * cfg.hidden_size


def plan(cfg: TrainConfig, topology: str, mfu: float = 0.4) -> PlanReport:
    """Compile ``cfg``'s train step for ``topology`` (e.g. ``v5e:16x16``) and report its per-chip footprint."""
    if not 0 < mfu <= 1:
        raise ClpError(f"mfu must be in (0, 1], got {mfu}")
    topology = topology.strip().lower()
    chip, devices = tpu_devices(topology)
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    except ClpError as e:
        raise ClpError(f"{topology} has {len(devices)} chips: {e}") from None
    model_cfg, _ = model_config(cfg)
    model_cfg = attention.resolve(model_cfg, devices[0].platform, cfg.data.seq_len)
    seq_len, rows = cfg.data.seq_len, cfg.data.batch_size
    if model_cfg.position == "learned" and seq_len > model_cfg.max_position_embeddings:
        raise ClpError(f"{cfg.model.init}: data.seq_len {seq_len} exceeds the model's "
                       f"{model_cfg.max_position_embeddings} learned positions")
    check_batch_shape((rows, seq_len), mesh, cfg.grad_accum_steps)
    optimizer = make_optimizer(cfg.optimizer)
    state, batch = abstract_state(model_cfg, mesh, optimizer), abstract_batch(cfg, mesh)
    step = make_train_step(model_cfg, optimizer, mesh, cfg.grad_accum_steps, skip_nonfinite=cfg.nonfinite == "skip")
    start = time.perf_counter()
    xla = compile_for_memory(step, state, batch)
    compile_seconds = time.perf_counter() - start
    tokens = rows * seq_len
    flops = train_step_flops(model_cfg, tokens, seq_len)
    kernel_flops = 0.0
    if model_cfg.attention == "splash":
        recomputed = model_cfg.remat != "none" and attention.CONTEXT not in REMAT_SAVES[model_cfg.remat]
        kernel_flops = attention.splash_train_flops(model_cfg, rows, seq_len, recomputed)
    kernel_flops += chunked_loss_flops(model_cfg, rows, seq_len)  # rows: the whole step, every microbatch
    tokens_per_s = mfu * len(devices) * chip.peak_flops * tokens / flops
    return PlanReport(
        topology=topology, device_kind=devices[0].device_kind, chips=len(devices), mesh=dict(mesh.shape),
        hbm_bytes=chip.hbm_bytes, param_bytes=bytes_per_device(state.params),
        opt_state_bytes=bytes_per_device(state.opt_state), batch_bytes=bytes_per_device(batch),
        temp_bytes=xla["temp"], code_bytes=xla["code"], total_bytes=xla["total"],
        fits=xla["error"] is None and xla["total"] <= chip.hbm_bytes, headroom_bytes=chip.hbm_bytes - xla["total"],
        tokens_per_step=tokens, flops_per_step=flops,
        xla_flops_per_step=None if xla["flops"] is None else xla["flops"] * len(devices) * cfg.grad_accum_steps,
        mfu=mfu, peak_flops_per_chip=chip.peak_flops, tokens_per_s=tokens_per_s, step_seconds=tokens / tokens_per_s,
        compile_seconds=compile_seconds, kernel_flops_per_step=kernel_flops, attention=model_cfg.attention,
        remat=model_cfg.remat, logits_chunk=model_cfg.logits_chunk, xla_error=xla["error"],
        xla_bytes_accessed_per_chip=None if xla["bytes"] is None else xla["bytes"] * cfg.grad_accum_steps,
        hbm_bandwidth=chip.hbm_bandwidth)


# Relative FLOPs difference below which two candidates tie in a search (then a fused kernel, then headroom wins).
FLOPS_TIE = 0.005

# The remat policies a search tries by default, from the most saved (fewest FLOPs) to the least.
SEARCH_REMAT = ("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full")


@dataclasses.dataclass
class SearchReport:
    """Every candidate ``plan_search`` compiled, and the one it chose (None: nothing fits with the headroom)."""

    candidates: list[PlanReport]
    best: PlanReport | None
    min_headroom_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"candidates": [c.as_dict() for c in self.candidates], "min_headroom_bytes": self.min_headroom_bytes,
                "best": None if self.best is None else self.best.as_dict()}

    def format_table(self) -> str:
        """One line per candidate; the chosen one marked with ``*``."""
        lines = [f"{'':2}{'attention':10}{'remat':34}{'chunk':>6}{'total GiB':>11}{'temp GiB':>10}{'XLA FLOPs':>12}"
                 f"{'s/step@peak':>13}{'s/step@HBM':>12}  fits"]
        for c in self.candidates:
            mark = "*" if c is self.best else " "
            flops = "n/a" if c.step_flops is None else f"{c.step_flops:.4g}"
            peak = "n/a" if c.peak_step_seconds is None else f"{c.peak_step_seconds:.4g}"
            hbm = "n/a" if c.hbm_step_seconds is None else f"{c.hbm_step_seconds:.4g}"
            fits = "yes" if c.fits and c.headroom_bytes >= self.min_headroom_bytes else "no" if not c.fits else "tight"
            lines.append(f"{mark} {c.attention:10}{c.remat:34}{c.logits_chunk or '-':>6}{c.total_bytes / GIB:11.2f}"
                         f"{c.temp_bytes / GIB:10.2f}{flops:>12}{peak:>13}{hbm:>12}  {fits}")
        lines.append("chosen: " + ("none fits with %.2f GiB headroom" % (self.min_headroom_bytes / GIB)
                                   if self.best is None else
                                   f"model.attention={self.best.attention} model.remat={self.best.remat} "
                                   f"model.logits_chunk={self.best.logits_chunk or 'null'}"))
        return "\n".join(lines)


def search_candidates(cfg: TrainConfig, platform: str, attentions: Sequence[str] | None = None,
                      remats: Sequence[str] = SEARCH_REMAT,
                      logits_chunks: Sequence[int | None] | None = None) -> list[tuple[str, str, int | None]]:
    """(attention, remat, logits_chunk) triples to compile; by default ``auto``'s choice on ``platform`` (its
    fused kernel, or xla where the kernel cannot serve the model) and the config's logits chunk.

    xla attention is left out by default where a kernel runs: it can win on FLOPs (no tile recomputation) while
    it writes and reads the [T, T] probabilities in HBM, which the FLOP count does not see."""
    if attentions is None:
        model_cfg, _ = model_config(cfg)
        attentions = (attention.resolve(model_cfg.replace(attention="auto"), platform, cfg.data.seq_len).attention,)
    chunks = (cfg.model.logits_chunk,) if logits_chunks is None else tuple(logits_chunks)
    return [(a, r, c) for a in attentions for r in remats for c in chunks]


def plan_search(cfg: TrainConfig, topology: str, mfu: float = 0.4, min_headroom_gib: float = 1.0,
                attentions: Sequence[str] | None = None, remats: Sequence[str] = SEARCH_REMAT,
                logits_chunks: Sequence[int | None] | None = None) -> SearchReport:
    """Plan every candidate; choose the fewest ``step_flops`` (XLA's and the kernels') that fits with
    ``min_headroom_gib`` to spare. FLOPs within ``FLOPS_TIE`` of the fewest count as equal (a FLOP count is not
    a step time); among those a fused kernel, then the most headroom wins (``choose_candidate``)."""
    parse_topology(topology)  # a bad name fails before the first compile
    reports = []
    for attn, remat, chunk in search_candidates(cfg, "tpu", attentions, remats, logits_chunks):
        candidate = cfg.model_copy(deep=True)
        candidate.model.attention, candidate.model.remat, candidate.model.logits_chunk = attn, remat, chunk
        reports.append(plan(candidate, topology, mfu))
    need = int(min_headroom_gib * GIB)
    return SearchReport(candidates=reports, best=choose_candidate(reports, need), min_headroom_bytes=need)


def choose_candidate(reports: Sequence[PlanReport], min_headroom_bytes: int) -> PlanReport | None:
    """The fewest FLOPs per step that fits with ``min_headroom_bytes`` to spare; None when nothing fits.

    FLOPs within ``FLOPS_TIE`` count as equal. A fused kernel then wins (it never writes the scores to HBM, a
    cost FLOP counts do not see), then the most headroom."""
    fitting = [r for r in reports if r.fits and r.headroom_bytes >= min_headroom_bytes
               and r.xla_flops_per_step is not None]
    fewest = min((r.step_flops for r in fitting), default=0.0)
    tied = [r for r in fitting if r.step_flops <= fewest * (1 + FLOPS_TIE)]
    return max(tied, key=lambda r: (r.attention != "xla", r.headroom_bytes, -r.step_flops), default=None)
