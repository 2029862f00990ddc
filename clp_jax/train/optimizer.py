"""AdamW with warmup + cosine/linear decay, a weight-decay mask, global-norm clipping and an embeddings-first stage.

The update is ``clip -> adam direction (+ weight decay) -> scale by -learning_rate(step)``; weight decay is
decoupled and scaled by the learning rate as in ``torch.optim.AdamW``. With ``embeddings_only_steps = K > 0``
only the ``embed`` and ``lm_head`` subtrees train during updates 0..K-1: the other parameters' gradients are
zeroed before clipping (so the clip sees only what trains), their updates are exactly zero, and their Adam
moments and bias-correction count stay untouched, so their Adam starts fresh at update K. The learning-rate
schedule is one global schedule counted from update 0 for every parameter.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import optax
from pydantic import Field, ValidationInfo, field_validator

from clp_jax.config import ConfigModel
from clp_jax.errors import ClpError

EMBEDDING_SUBTREES: tuple[str, ...] = ("embed", "lm_head")
_NO_DECAY_NAMES = ("bias", "scale")


class OptimizerConfig(ConfigModel):
    """The ``optimizer:`` section of a training config."""

    learning_rate: float = Field(3e-4, gt=0)  # peak, reached after warmup
    warmup_steps: int = Field(0, ge=0)
    total_steps: int = Field(gt=0)  # where decay ends (counted from step 0, warmup included)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_learning_rate_fraction: float = Field(0.1, ge=0, le=1)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float | None = Field(1.0, ge=0)  # 0 or None: no clipping
    embeddings_only_steps: int = Field(0, ge=0)

    @field_validator("total_steps")
    @classmethod
    def _after_warmup(cls, v: int, info: ValidationInfo) -> int:
        warmup = info.data.get("warmup_steps", 0)
        if v <= warmup:
            raise ValueError(f"total_steps ({v}) must be larger than warmup_steps ({warmup})")
        return v


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 (step 0) to the peak (step ``warmup_steps``), then decay to the end by ``total_steps``.

    cosine: ``end + (peak - end) * (1 + cos(pi * f)) / 2``; linear: ``peak + (end - peak) * f``, with
    ``f = (step - warmup) / (total - warmup)`` clipped to [0, 1] and ``end = peak * end_learning_rate_fraction``;
    constant: the peak after warmup.
    """
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    end, span = peak * cfg.end_learning_rate_fraction, cfg.total_steps - warmup
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, span, alpha=cfg.end_learning_rate_fraction)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, span)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _top_key(path: tuple) -> Any:
    return getattr(path[0], "key", None) if path else None


def _last_key(path: tuple) -> Any:
    return getattr(path[-1], "key", None) if path else None


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and embeddings (ndim >= 2); False for norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: len(p.shape) >= 2 and _last_key(path) not in _NO_DECAY_NAMES, params)


def embedding_mask(params: Any) -> Any:
    """True for leaves under the ``embed`` and ``lm_head`` subtrees (the embeddings-only stage trains these)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _top_key(path) in EMBEDDING_SUBTREES, params)


def _labels(params: Any) -> Any:
    return jax.tree.map(lambda e: "embed" if e else "rest", embedding_mask(params))


def _direction(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Adam's normalized step plus decoupled weight decay, before scaling by -learning_rate."""
    return optax.chain(optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
                       optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))


def make_optimizer(cfg: OptimizerConfig, params: Any = None) -> optax.GradientTransformation:
    """The AdamW optimizer ``cfg`` describes; ``params`` (arrays or shapes), when given, is checked against it.

    Masks are computed from whatever tree optax passes, so one optimizer serves any parameter tree. The current
    learning rate lives in the state: ``current_learning_rate(opt_state)``.
    """
    k = cfg.embeddings_only_steps
    if params is not None and k and not any(jax.tree.leaves(embedding_mask(params))):
        raise ClpError(f"optimizer.embeddings_only_steps={k} but the model has no {' or '.join(EMBEDDING_SUBTREES)} "
                       "parameters")
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    lr = optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=learning_rate_schedule(cfg))
    if not k:
        return optax.chain(*clip, _direction(cfg), lr)
    rest = lambda p: jax.tree.map(lambda e: not e, embedding_mask(p))  # noqa: E731
    freeze_grads = optax.transforms.conditionally_transform(
        optax.masked(optax.set_to_zero(), rest), lambda step: step < k)
    direction = optax.multi_transform(
        {"embed": _direction(cfg),
         "rest": optax.transforms.conditionally_mask(_direction(cfg), lambda step: step >= k)},
        _labels)
    return optax.chain(freeze_grads, *clip, direction, lr)


def current_learning_rate(opt_state: Any) -> Any:
    """The learning rate of the last update (of step 0 before any) stored in a ``make_optimizer`` state, else None."""
    return optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=lambda _, v: hasattr(v, "dtype"))
