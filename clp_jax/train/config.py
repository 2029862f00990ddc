"""The typed config of a training run (`clp-jax train` and `clp-jax sft` share it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clp_jax.config import ConfigModel
from clp_jax.data.pipeline import DataConfig
from clp_jax.hf.reader import read_config
from clp_jax.models.config import ATTENTION_IMPLEMENTATIONS, NUMERICS_FIELDS, REMAT_POLICIES, TransformerConfig
from clp_jax.sharding import MeshConfig
from clp_jax.train.checkpoint import CheckpointConfig
from clp_jax.train.optimizer import OptimizerConfig


class ModelSection(ConfigModel):
    """Initial weights (an HF dir, e.g. `clp-jax transfer`'s output) and numerics (``NUMERICS_FIELDS``)."""

    init: str
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights (and optimizer state)
    # What the backward pass keeps of each layer (MaxText's policy names); true = full, false = none.
    remat: Literal[REMAT_POLICIES] = "none"  # type: ignore[valid-type]
    # Positions whose [rows, chunk, vocab] float32 logits exist at once in the loss (None: the whole sequence).
    logits_chunk: int | None = Field(None, ge=1)
    # auto: splash on TPU, cudnn on NVIDIA GPUs where the model allows, else xla (models.attention).
    attention: Literal[ATTENTION_IMPLEMENTATIONS] = "auto"  # type: ignore[valid-type]

    @field_validator("remat", mode="before")
    @classmethod
    def _remat_bool(cls, value: Any) -> Any:
        """``remat: true/false`` (older configs) mean the full and no remat policies."""
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value


class EvalSection(ConfigModel):
    """Held-out loss, perplexity and bits per byte per data source (language) every `every_steps` steps."""

    every_steps: int = Field(100, ge=1)
    max_batches: int | None = Field(None, ge=1)
    at_start: bool = False  # also at step 0, before the first update (not when resuming)


class DistributedSection(ConfigModel):
    """Multi-host: `auto` initializes when the environment is a known cluster (TPU pod) or an address is given."""

    mode: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = Field(None, ge=1)
    process_id: int | None = Field(None, ge=0)


class TrainConfig(ConfigModel):
    """A continued-pretraining (or SFT) run: model, data, optimizer, mesh, checkpoints, eval, export."""

    run_dir: str
    model: ModelSection
    data: DataConfig
    optimizer: OptimizerConfig
    steps: int = Field(ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalSection = EvalSection()
    log_every_steps: int = Field(10, ge=1)
    export_every_steps: int | None = Field(None, ge=1)  # HF export mid-run
    export_final: bool = True  # HF export to run_dir/hf/final at the end
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = Field(10, ge=1)  # nonfinite=skip: stop after this many skipped steps in a row
    distributed: DistributedSection = DistributedSection()
    tensorboard: bool = True
    peak_flops: float | None = Field(None, gt=0)  # for MFU; default: the chip table's vendor peak (none on CPU)

    @model_validator(mode="before")
    @classmethod
    def _default_total_steps(cls, data: Any) -> Any:
        """The learning-rate schedule ends at `steps` unless `optimizer.total_steps` says otherwise."""
        if isinstance(data, dict) and "steps" in data:
            opt = data.get("optimizer")
            if opt is None:
                data = {**data, "optimizer": {"total_steps": data["steps"]}}
            elif isinstance(opt, dict) and "total_steps" not in opt:
                data = {**data, "optimizer": {**opt, "total_steps": data["steps"]}}
        return data


def model_config(cfg: TrainConfig) -> tuple[TransformerConfig, str]:
    """The architecture of ``model.init`` with the run's numerics, and the dtype its checkpoint stores weights in
    (exports keep it; float32 without weight files); a ClpWarning when its config.json sets dropout."""
    stored = read_config(cfg.model.init, warn_dropout=True)
    return stored.replace(**{k: getattr(cfg.model, k) for k in NUMERICS_FIELDS}), stored.param_dtype
