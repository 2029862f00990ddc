"""Per-block transfer weights in float32: cosine similarity, CLP, top-k softmax and sparsemax."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def unit_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows scaled to unit length in float32 (all-zero rows stay zero), and their norms."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1))
    safe = jnp.where(norm > 0, norm, 1.0)
    return jnp.where((norm > 0)[:, None], x / safe[:, None], 0.0), norm


def sparsemax(z: jax.Array) -> jax.Array:
    """Sparsemax over the last axis (Martins & Astudillo 2016): Euclidean projection onto the simplex."""
    z_sorted = -jnp.sort(-z, axis=-1)
    cumsum = jnp.cumsum(z_sorted, axis=-1)
    k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    # 1 + k z_(k) > sum_{j<=k} z_(j) holds on a prefix of the sorted order; its length is the support size.
    support = jnp.sum(1 + k * z_sorted > cumsum, axis=-1, keepdims=True)
    tau = (jnp.take_along_axis(cumsum, support - 1, axis=-1) - 1) / support.astype(z.dtype)
    return jnp.maximum(z - tau, 0.0)


def clp_factors(overlap_helper_unit: jax.Array, overlap_rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CLP's sums are linear in the cosines: sum_j cos_ij S_j = u_i (U^T S) and sum_j cos_ij = u_i (U^T 1).

    Returns ``U^T S`` [Dh, D] and ``U^T 1`` [Dh], so a missing row costs Dh*D instead of overlap*(Dh+D).
    """
    projection = jnp.matmul(overlap_helper_unit.T, overlap_rows, precision=HIGHEST)
    return projection, jnp.sum(overlap_helper_unit, axis=0)


def block_embeddings(
    strategy: str, helper_block: jax.Array, shared: dict[str, jax.Array], top_k: int, temperature: float,
) -> tuple[jax.Array, jax.Array]:
    """Target rows [B, D] for a block of missing tokens, and a [B] flag for rows given the fallback.

    ``shared`` holds float32 arrays: ``overlap`` [n, D] (source rows of the overlap tokens),
    ``overlap_helper`` [n, Dh] (their unit-length helper rows), ``fallback`` [D], and for ``clp`` the
    ``clp_factors`` as ``projection`` and ``direction_sum``.
    """
    unit, norm = unit_rows(helper_block)
    degenerate = ~(norm > 0) | ~jnp.isfinite(norm)
    if strategy == "clp":
        total = jnp.matmul(unit, shared["direction_sum"], precision=HIGHEST)
        degenerate |= ~(total > 0) | ~jnp.isfinite(total)
        weighted = jnp.matmul(unit, shared["projection"], precision=HIGHEST)
        rows = weighted / jnp.where(degenerate, 1.0, total)[:, None]
    elif strategy in ("clp-topk", "clp-sparsemax"):
        cos = jnp.matmul(unit, shared["overlap_helper"].T, precision=HIGHEST)
        if strategy == "clp-topk":
            values, index = jax.lax.top_k(cos, top_k)
            degenerate |= ~jnp.all(jnp.isfinite(values), axis=-1)
            weights = jax.nn.softmax(values / temperature, axis=-1)
            rows = jnp.einsum("bk,bkd->bd", weights, shared["overlap"][index], precision=HIGHEST)
        else:
            degenerate |= ~jnp.all(jnp.isfinite(cos), axis=-1)
            weights = sparsemax(jnp.where(degenerate[:, None], 0.0, cos) / temperature)
            rows = jnp.matmul(weights, shared["overlap"], precision=HIGHEST)
    else:
        raise ValueError(f"no block weights for strategy {strategy!r}")
    return jnp.where(degenerate[:, None], shared["fallback"][None, :], rows), degenerate
