"""The jitted train step: token-weighted next-token cross-entropy, gradient accumulation, AdamW.

A batch is a dict of [B, T] arrays: int32 ``tokens``, ``segment_ids`` (0 = padding), ``positions`` and, for
SFT, float32 ``loss_weights`` aligned to predicting token t + 1 from t. Position t is weighted when t and t + 1
lie in the same segment (``data.packing.next_token_targets``), times ``loss_weights`` when present.
The loss is (sum of weighted nll) / (sum of weights), computed over the whole batch even when it is split
into micro-batches, so accumulation over k micro-batches equals one big batch up to float rounding.
Held-out batches may carry int32 ``bytes`` (UTF-8 bytes each token covers); ``target_bytes`` sums the weighted
bytes of the targets, for bits per byte (``eval.heldout``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clp_jax import models
from clp_jax.errors import ClpError
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import batch_divisor, batch_sharding, constrain
from clp_jax.train.loss import token_targets, weighted_nll_sum
from clp_jax.train.optimizer import current_learning_rate
from clp_jax.train.state import TrainState, state_shardings

Batch = Mapping[str, jax.Array]


def target_weights(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Next-token targets and their float32 weights: same segment, times ``loss_weights`` when present."""
    targets, weights = token_targets(batch["tokens"], batch["segment_ids"])
    if "loss_weights" in batch:
        weights = weights * batch["loss_weights"].astype(jnp.float32)
    return targets, weights


def loss_sums(params: Any, cfg: TransformerConfig, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token nll, sum of weights), float32; the model computes in ``cfg.dtype``."""
    hidden = models.hidden_states(params, cfg, batch["tokens"], batch.get("positions"), batch["segment_ids"])
    targets, weights = target_weights(batch)
    w, vocab_major = models.output_layer(params, cfg)
    return (weighted_nll_sum(hidden, w, targets, weights, cfg.logits_chunk, vocab_major, cfg.final_softcap),
            jnp.sum(weights))


def check_batch_shape(shape: Sequence[int], mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """Raise a ClpError unless ``shape`` = [rows, T] with rows a multiple of micro-batches times batch devices."""
    need = grad_accum_steps * batch_divisor(mesh)
    if len(shape) != 2 or shape[0] % need:
        raise ClpError(f"train batch of shape {tuple(shape)}: expected [rows, seq_len] with rows a multiple of "
                       f"grad_accum_steps ({grad_accum_steps}) x data*fsdp devices ({batch_divisor(mesh)}) = {need}")


def input_sharding(mesh: Mesh) -> NamedSharding:
    """The rules table's sharding for [batch, length] arrays (whose batch divides the batch devices)."""
    return batch_sharding(mesh, (batch_divisor(mesh), 1))


def _grads(params: Any, cfg: TransformerConfig, batch: Batch, accum: int) -> tuple:
    """Summed (not averaged) f32 grads of the weighted nll, its sum and the token count, over ``accum`` micro-batches.

    Micro-batch i is rows i::accum, so each device's rows split evenly without moving data between devices.
    """
    grad_sum = jax.value_and_grad(lambda p, b: loss_sums(p, cfg, b), has_aux=True)
    if accum == 1:
        (total, tokens), grads = grad_sum(params, batch)
        return grads, total, tokens

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch", "length"))

    def body(carry: tuple, micro: Batch) -> tuple:
        grads, total, tokens = carry
        (t, n), g = grad_sum(params, micro)
        return (jax.tree.map(jnp.add, grads, g), total + t, tokens + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, total, tokens), _ = jax.lax.scan(body, init, {k: split(v) for k, v in batch.items()})
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), total, tokens


def make_train_step(cfg: TransformerConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    grad_accum_steps: int = 1, skip_nonfinite: bool = False,
                    compiler_options: Mapping[str, Any] | None = None) -> Callable:
    """Jitted ``step(state, batch) -> (state, metrics)`` with NamedShardings from the rules table; donates state.

    The batch has ``grad_accum_steps * micro_rows`` rows (see ``check_batch_shape``). Metrics are float32
    scalars: loss, tokens, grad_norm (before clipping), learning_rate (this update's), param_norm and
    nonfinite (1.0 when the loss or gradients are NaN/inf). With ``skip_nonfinite`` such a step leaves
    params and optimizer state unchanged (the step counter advances, the optimizer's count and so the
    learning-rate schedule do not); otherwise it is applied and the caller must stop.
    ``compiler_options`` go to XLA (e.g. TPU scheduler flags).
    """
    if grad_accum_steps < 1:
        raise ClpError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    shardings = state_shardings(cfg, mesh, optimizer)
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        check_batch_shape(batch["tokens"].shape, mesh, grad_accum_steps)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for sharding.constrain
            grads, total, tokens = _grads(state.params, cfg, batch, grad_accum_steps)
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        loss, grad_norm = total / denom, optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        lr = current_learning_rate(opt_state)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(nonfinite, b, a), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(jnp.nan if lr is None else lr, jnp.float32),
                   "param_norm": optax.global_norm(params), "nonfinite": nonfinite.astype(jnp.float32)}
        metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(shardings, input_sharding(mesh)), out_shardings=(shardings, replicated),
                   donate_argnums=(0,), compiler_options=dict(compiler_options) if compiler_options else None)


def target_bytes(batch: Batch) -> jax.Array:
    """Sum of the weights times the ``bytes`` of each target (token t + 1), float32; 0 when the batch has none."""
    if "bytes" not in batch:
        return jnp.zeros((), jnp.float32)
    _, weights = target_weights(batch)
    next_bytes, _ = token_targets(batch["bytes"], batch["segment_ids"])  # bytes[:, t + 1] at t
    return jnp.sum(weights * next_bytes.astype(jnp.float32))
