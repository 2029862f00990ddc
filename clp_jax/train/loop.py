"""The training loop: read the config top to bottom, run steps, log, evaluate, checkpoint, export.

Everything with side effects (files, console, signals) is here or in the CLI; the step itself is pure.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from clp_jax import progress
from clp_jax.config import save_config
from clp_jax.data.pipeline import build_data
from clp_jax.errors import ClpError
from clp_jax.eval.heldout import heldout_metrics, make_heldout_step
from clp_jax.files import write_json
from clp_jax.hf.reader import load_params, read_config_dict
from clp_jax.hf.tokenizer import check_tokenizer_fits, load_tokenizer
from clp_jax.hf.writer import save_pretrained
from clp_jax.memory import check_compiled_fits
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import batch_divisor, global_batch, mesh_from_config
from clp_jax.train.checkpoint import Checkpointer
from clp_jax.train.config import DistributedSection, TrainConfig, model_config
from clp_jax.train.flops import train_step_flops
from clp_jax.train.optimizer import make_optimizer
from clp_jax.train.run_log import MetricsWriter, device_peak_flops, drop_metrics_after, json_safe
from clp_jax.train.state import abstract_state, create_sharded_state
from clp_jax.train.step import make_train_step

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(cfg: DistributedSection) -> None:
    """jax.distributed.initialize when asked, or (auto) on a known cluster or with an explicit coordinator."""
    if cfg.mode == "off" or jax.distributed.is_initialized():
        return
    explicit = cfg.coordinator_address is not None
    if cfg.mode == "on" or explicit or any(k in os.environ for k in _CLUSTER_ENV):
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[train] {msg}", file=sys.stderr, flush=True)


def check_shapes(cfg: TrainConfig, model_cfg: TransformerConfig, mesh: jax.sharding.Mesh) -> None:
    """A ClpError before anything runs for a seq_len past the model's learned positions or a batch the mesh and
    gradient accumulation cannot split evenly."""
    seq_len, positions = cfg.data.seq_len, model_cfg.max_position_embeddings
    if model_cfg.position == "learned" and seq_len > positions:
        raise ClpError(f"{cfg.model.init}: data.seq_len {seq_len} exceeds the model's {positions} learned positions; "
                       f"set data.seq_len={positions} or less")
    rows, accum = cfg.data.batch_size, cfg.grad_accum_steps
    need = accum * batch_divisor(mesh)
    if rows % need:
        options = " or ".join(str(n) for n in (rows // need * need, -(-rows // need) * need) if n)
        raise ClpError(f"data.batch_size {rows} is not a multiple of grad_accum_steps ({accum}) x mesh data*fsdp "
                       f"({mesh.shape['data']}*{mesh.shape['fsdp']}) = {need}; use data.batch_size={options}")


_META_NAMES = {"init": "model.init", "seq_len": "data.seq_len"}


def run_meta(cfg: TrainConfig) -> dict[str, Any]:
    """What each checkpoint records about its run; a resume with other values is refused."""
    return {"init": os.path.abspath(cfg.model.init), "seq_len": cfg.data.seq_len}


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's loss, tokens/s and (when known) MFU."""
    out = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
    if "mfu" in record:
        out["mfu"] = f"{record['mfu']:.1%}"
    return out


def _good(record: dict[str, Any]) -> bool:
    """False when the step was skipped (non-finite loss or gradients) or left non-finite parameters."""
    return not record.get("nonfinite") and math.isfinite(record.get("param_norm", 0.0))


class Trainer:
    """One run: set up from a TrainConfig (resuming from its run dir when checkpoints exist), then ``run()``."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        initialize_distributed(cfg.distributed)
        self.cfg, self.progress = cfg, progress and jax.process_index() == 0
        self.mesh = mesh_from_config(cfg.mesh)
        self.model_cfg, self.export_dtype = model_config(cfg)
        check_shapes(cfg, self.model_cfg, self.mesh)
        self.checkpointer = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint,
                                         meta=run_meta(cfg))
        try:
            self._check_resumable()
            self.tokenizer = load_tokenizer(cfg.model.init)
            check_tokenizer_fits(self.tokenizer, self.model_cfg.vocab_size, cfg.model.init)
            self.data = build_data(cfg.data, self.tokenizer, steps=cfg.steps)
            _say("data:\n" + self.data.format_report())
            self.optimizer = make_optimizer(cfg.optimizer)
            self.state, self.step = self._initial_state()
        except BaseException:
            self.checkpointer.close()
            raise
        self._write_run_files()  # only now: a rejected resume leaves the run dir as it was
        self.skipped_in_a_row = 0
        self.train_step = make_train_step(self.model_cfg, self.optimizer, self.mesh, cfg.grad_accum_steps,
                                          skip_nonfinite=cfg.nonfinite == "skip")
        self.heldout_step = make_heldout_step(self.model_cfg, self.mesh)

    def _initial_state(self) -> tuple[Any, int]:
        restored = self.checkpointer.restore_latest_valid(abstract_state(self.model_cfg, self.mesh, self.optimizer))
        if restored is not None:
            step, state, data_state = restored
            if step > self.cfg.steps:
                raise ClpError(f"{self.cfg.run_dir}: its latest checkpoint is at step {step}, past steps="
                               f"{self.cfg.steps}; set steps={step} or more to continue it, or use another run_dir")
            self.data.train.set_state(data_state)
            _say(f"resumed from checkpoint at step {step}")
            return state, step
        _, params = load_params(self.cfg.model.init, self.mesh, self.model_cfg.replace(
            param_dtype=self.export_dtype), progress=self.progress)
        _say(f"initialized from {self.cfg.model.init} ({self.model_cfg.num_params():,} parameters, "
             f"mesh {dict(self.mesh.shape)})")
        return create_sharded_state(params, self.model_cfg, self.optimizer, self.mesh), 0

    def _check_resumable(self) -> None:
        """A ClpError when the latest checkpoint was saved by a run with another model.init or data.seq_len."""
        step = self.checkpointer.latest_step()
        try:
            saved = self.checkpointer.read_meta(step) if step is not None else None
        except Exception:  # an unreadable step: restore_latest_valid reports it and falls back
            return
        saved, ours = saved or {}, self.checkpointer.meta or {}
        diff = [f"{_META_NAMES[k]}={saved[k]} (this run: {v})" for k, v in ours.items() if k in saved and saved[k] != v]
        if diff:
            raise ClpError(f"{self.cfg.run_dir}: its checkpoint at step {step} was saved with {'; '.join(diff)}; "
                           "rerun with the same settings to resume it, or use another run_dir")

    def _write_run_files(self) -> None:
        """config.yaml and data_report.json of this run, and metrics.jsonl cut back to the step it starts from."""
        if jax.process_index() != 0:
            return
        os.makedirs(self.cfg.run_dir, exist_ok=True)
        save_config(self.cfg, os.path.join(self.cfg.run_dir, "config.yaml"))
        write_json(os.path.join(self.cfg.run_dir, "data_report.json"), self.data.report())
        # a fresh start (no checkpoint) logs from step 0 again; a resume from the checkpoint's step onwards
        dropped = drop_metrics_after(self.cfg.run_dir, self.step if self.step else -1)
        if dropped:
            _say(f"metrics.jsonl: dropped {dropped} records of steps this run logs again")

    def export(self, out_dir: str) -> None:
        """The current parameters as an HF dir, in the initial checkpoint's dtype, with the tokenizer."""
        save_pretrained(out_dir, self.state.params, self.model_cfg.replace(param_dtype=self.export_dtype),
                        base_config=read_config_dict(self.cfg.model.init), tokenizer=self.tokenizer, overwrite=True)

    def _check_finite(self, pending: list[tuple[int, dict]], writer: MetricsWriter) -> list[dict]:
        """Host copies of the pending steps' metrics; a ClpError (after logging them) for a non-finite step under
        nonfinite=stop, or for the ``max_skipped_steps``-th skipped step in a row under nonfinite=skip."""
        records = []
        for step, m in pending:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            records.append({"step": step, **m})
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if m["nonfinite"] else 0
            if self.cfg.nonfinite == "stop" and m["nonfinite"]:
                problem, advice = f"loss or gradients are not finite (loss={m['loss']})", "or set nonfinite=skip"
            elif self.skipped_in_a_row >= self.cfg.max_skipped_steps:
                problem = (f"{self.skipped_in_a_row} steps in a row skipped for a non-finite loss or gradients "
                           f"(max_skipped_steps={self.cfg.max_skipped_steps})")
                advice = "or raise max_skipped_steps"
            else:
                continue
            for r in records:
                writer.write(r.pop("step"), r)
            raise ClpError(f"step {step}: {problem}; stopped. {self._last_good()} (lower the learning rate, {advice})")
        return records

    def _last_good(self) -> str:
        """Where a rerun would resume from: the newest checkpoint, or the start."""
        last = self.checkpointer.latest_step()
        where = f"{self.cfg.run_dir}/checkpoints"
        if last is None:
            return f"No checkpoint saved yet in {where}: a rerun starts again from model.init"
        return f"Last good checkpoint: step {last} in {where}"

    def _peak_flops(self) -> float | None:
        """The FLOP/s that MFU divides by: ``peak_flops`` or the chip table's; None (no MFU) for a CPU."""
        if self.cfg.peak_flops:
            peak, source = self.cfg.peak_flops, "config peak_flops"
        else:
            peak, source = device_peak_flops()
        if peak is None:
            _say(f"MFU: no known peak for {source}; set peak_flops to report it")
        else:
            _say(f"MFU against {peak / 1e12:.3g} TFLOP/s: {source}")
        return peak

    def _compile_step(self, batch: dict[str, jax.Array]) -> Callable:
        """The train step compiled for this run's shapes, refused first when it cannot fit in a device's memory.

        Single-process runs only: on XLA:CPU an ahead-of-time compile in several processes breaks the collectives'
        set-up, so multi-host runs jit as usual (`clp-jax plan` checks their memory before a pod is paid for).
        """
        if jax.process_count() > 1:
            return self.train_step
        compiled = self.train_step.lower(self.state, batch).compile()
        d = self.cfg.data
        check_compiled_fits(compiled, self.mesh, f"the train step (data.batch_size {d.batch_size} x data.seq_len "
                            f"{d.seq_len}, grad_accum_steps {self.cfg.grad_accum_steps})",
                            "lower data.batch_size or data.seq_len, raise grad_accum_steps, or set model.remat=true "
                            "or model.logits_chunk=256")
        return compiled

    def run(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps``; ``on_step(step)`` is called after each step's logging and checkpointing."""
        cfg, data = self.cfg, self.data
        writer = MetricsWriter(cfg.run_dir, cfg.tensorboard)
        flag = self.checkpointer.install_preemption_handler()
        peak = self._peak_flops()
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops_per_step = train_step_flops(self.model_cfg, tokens_per_step, cfg.data.seq_len)
        pending: list[tuple[int, dict]] = []
        last: dict[str, Any] = {}
        status = "finished"
        bar = progress.bar(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                           dynamic_ncols=True)
        try:
            if cfg.eval.at_start and self.step == 0:
                writer.write(0, heldout_metrics(self.state.params, self.heldout_step, data, self.mesh,
                                                cfg.eval.max_batches))
            window_start, window_steps = time.perf_counter(), 0
            step_fn = None
            while self.step < cfg.steps:
                batch = global_batch(next(data.train), self.mesh)
                step_fn = step_fn or self._compile_step(batch)
                self.state, metrics = step_fn(self.state, batch)
                self.step += 1
                window_steps += 1
                pending.append((self.step, metrics))
                if len(pending) > 2:  # at most two steps in flight (XLA:CPU collectives can stall beyond that)
                    jax.block_until_ready(pending[-3][1])
                log_now = self.step % cfg.log_every_steps == 0 or self.step == cfg.steps
                save_now = self.step % cfg.checkpoint.every_steps == 0
                eval_now = self.step % cfg.eval.every_steps == 0 or self.step == cfg.steps
                preempt = self.checkpointer.should_save_for_preemption(self.step)
                if log_now or save_now or eval_now or preempt:
                    records = self._check_finite(pending, writer)
                    pending = []
                    rate = window_steps / (time.perf_counter() - window_start)
                    last = dict(records[-1], tokens_per_s=rate * tokens_per_step)
                    if peak is not None:
                        last["mfu"] = rate * flops_per_step / peak
                    if eval_now:
                        last.update(heldout_metrics(self.state.params, self.heldout_step, data, self.mesh,
                                                    cfg.eval.max_batches))
                    for r in records[:-1]:
                        writer.write(r.pop("step"), r)
                    writer.write(self.step, {k: v for k, v in last.items() if k != "step"})
                    bar.set_postfix(_postfix(last))
                    window_start, window_steps = time.perf_counter(), 0  # rates exclude eval and logging
                if _good(last):  # no periodic checkpoint of a bad state, so good ones are not rotated out
                    self.checkpointer.save(self.step, self.state, data.train.get_state())
                if cfg.export_every_steps and self.step % cfg.export_every_steps == 0 and self.step < cfg.steps:
                    self.export(os.path.join(cfg.run_dir, "hf", f"step_{self.step}"))
                bar.update(1)
                if on_step is not None:
                    on_step(self.step)
                if preempt:
                    self.checkpointer.save(self.step, self.state, data.train.get_state(), force=True)
                    status = "preempted"
                    break
            if status == "finished":
                self.checkpointer.save(self.step, self.state, data.train.get_state(), force=True)
        finally:
            bar.close()
            self.checkpointer.wait()
            writer.close()
            flag.close()
        if status == "finished" and cfg.export_final:
            self.export(os.path.join(cfg.run_dir, "hf", "final"))
        summary = json_safe({"status": status, "step": self.step, "run_dir": cfg.run_dir,
                             **{k: v for k, v in last.items() if k != "step"}, "data": data.train.counters()})
        write_json(os.path.join(cfg.run_dir, "summary.json"), summary)
        self.checkpointer.close()
        return summary
