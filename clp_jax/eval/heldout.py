"""Held-out evaluation during training: the train loss (``train.step.loss_sums``) summed over packed held-out
batches, giving loss, perplexity and bits per byte per eval source."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clp_jax import models
from clp_jax.data.pipeline import Data
from clp_jax.eval.perplexity import bits_per_byte
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import global_batch, tree_shardings
from clp_jax.train.step import Batch, input_sharding, loss_sums, target_bytes


def make_heldout_step(cfg: TransformerConfig, mesh: Mesh) -> Callable:
    """Jitted ``(params, batch) -> {"loss_sum", "tokens", "bytes"}``, float32 scalars summed over the batch."""
    param_shardings = tree_shardings(models.param_axes(cfg), models.param_shapes(cfg), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def heldout_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            total, tokens = loss_sums(params, cfg, batch)
        return {"loss_sum": total, "tokens": tokens, "bytes": target_bytes(batch)}

    return jax.jit(heldout_step, in_shardings=(param_shardings, input_sharding(mesh)), out_shardings=replicated)


def heldout_sums(params: Any, step: Callable, batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
                 max_batches: int | None) -> dict[str, float]:
    """``step``'s loss_sum, tokens and bytes added over (at most ``max_batches`` of) this host's ``batches``."""
    sums = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for i, rows in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        m = jax.device_get(step(params, global_batch(rows, mesh)))
        sums = {k: v + float(m[k]) for k, v in sums.items()}
    return sums


def heldout_metrics(params: Any, step: Callable, data: Data, mesh: Mesh, max_batches: int | None) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte per source: ``eval/<source>/loss``, ``/ppl``, ``/bpb``.

    bpb is the summed nll (nats) of the predicted targets over ln 2 times the UTF-8 bytes those targets cover.
    """
    out = {}
    for name in data.eval_sets:
        sums = heldout_sums(params, step, data.eval_batches(name), mesh, max_batches)
        total, tokens, num_bytes = sums["loss_sum"], sums["tokens"], sums["bytes"]
        if tokens:
            out[f"eval/{name}/loss"] = total / tokens
            out[f"eval/{name}/ppl"] = math.exp(min(total / tokens, 700.0))
        if num_bytes:
            out[f"eval/{name}/bpb"] = bits_per_byte(total, num_bytes)
    return out
