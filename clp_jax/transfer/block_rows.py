"""Per-block transfer rows in float32: CLP, top-k softmax, sparsemax, OMP and FVT weights, and the row checks."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
# Why a missing row got the fallback instead of its strategy's row; 0 means it did not.
REASONS = ("zero_helper", "cos_sum", "no_pieces", "norm")
OK, ZERO_HELPER, COS_SUM, NO_PIECES, NORM = range(5)
OMP_TOL = 1e-3  # OMP stops adding atoms once none correlates with the residual by more than this x ||h_i||
OMP_RIDGE = 1e-6  # relative to the largest selected atom's squared norm: keeps the normal equations solvable


@dataclass(frozen=True)
class BlockOptions:
    """Static parameters of the per-block weights (``min_cos_sum`` is absolute: min_mean_cos x overlap)."""

    top_k: int = 10
    temperature: float = 0.1
    omp_k: int = 64
    min_cos_sum: float = 0.0
    center_helper: bool = False


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


def omp_coefficients(target: jax.Array, atoms: jax.Array, atom_units: jax.Array, k: int) -> tuple[jax.Array, ...]:
    """Orthogonal matching pursuit of each target row [B, Dh] over ``atoms`` [n, Dh]: support [B, k], coefs [B, k].

    Each of k steps picks the unused atom most correlated (|cos|) with the residual, then refits all picked
    atoms by least squares (ridge-stabilized normal equations, Cholesky). Steps after the residual has no
    correlation above ``OMP_TOL`` x ||target|| add nothing; unused slots have coefficient 0.
    """
    rows, n = target.shape[0], atoms.shape[0]
    floor = OMP_TOL * jnp.sqrt(jnp.sum(target * target, axis=-1))
    solve = jax.vmap(lambda g, b: jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(g), True), b))

    def step(t: jax.Array, state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        support, active, used, _, residual = state
        corr = jnp.abs(jnp.matmul(residual, atom_units.T, precision=HIGHEST))
        corr = jnp.where(used, -1.0, corr)
        pick = jnp.argmax(corr, axis=-1).astype(jnp.int32)
        add = jnp.take_along_axis(corr, pick[:, None], axis=-1)[:, 0] > floor
        support, active = support.at[:, t].set(pick), active.at[:, t].set(add)
        used = used | (jax.nn.one_hot(pick, n, dtype=bool) & add[:, None])
        chosen = atoms[support] * active[..., None]
        gram = jnp.einsum("bkd,bld->bkl", chosen, chosen, precision=HIGHEST)
        diag = jnp.diagonal(gram, axis1=1, axis2=2)
        ridge = OMP_RIDGE * jnp.max(diag, axis=-1, keepdims=True) + 1e-30
        gram = gram + jax.vmap(jnp.diag)(jnp.where(active, ridge, 1.0))
        coef = solve(gram, jnp.einsum("bkd,bd->bk", chosen, target, precision=HIGHEST))
        residual = target - jnp.einsum("bk,bkd->bd", coef, chosen, precision=HIGHEST)
        return support, active, used, coef, residual

    init = (jnp.zeros((rows, k), jnp.int32), jnp.zeros((rows, k), bool), jnp.zeros((rows, n), bool),
            jnp.zeros((rows, k), jnp.float32), target)
    support, _, _, coef, _ = jax.lax.fori_loop(0, k, step, init)
    return support, coef


def block_embeddings(
    strategy: str, helper_block: jax.Array, shared: dict[str, jax.Array], opts: BlockOptions,
) -> tuple[jax.Array, jax.Array]:
    """Target rows [B, D] for a block of missing tokens from their helper rows, and a [B] reason code (0: fine).

    ``shared`` holds float32 arrays: ``overlap`` [n, D] (source rows of the overlap tokens),
    ``overlap_helper`` [n, Dh] (their unit-length, optionally centered, helper rows), ``helper_mean`` [Dh],
    ``fallback`` [D], for ``clp`` the ``clp_factors`` as ``projection`` and ``direction_sum``, and for ``omp``
    the centered (or raw) helper rows ``overlap_atoms`` [n, Dh]. Rows with a reason are left for the caller.
    """
    raw = helper_block.astype(jnp.float32)
    raw_norm = jnp.sqrt(jnp.sum(raw * raw, axis=-1))
    helper = raw - shared["helper_mean"] if opts.center_helper else raw
    unit, norm = unit_rows(helper)
    bad = ~(raw_norm > 0) | ~jnp.isfinite(raw_norm) | ~(norm > 0) | ~jnp.isfinite(norm)
    reason = jnp.where(bad, ZERO_HELPER, OK).astype(jnp.int8)
    if strategy == "clp":
        total = jnp.matmul(unit, shared["direction_sum"], precision=HIGHEST)
        small = ~(total > opts.min_cos_sum) | ~jnp.isfinite(total)
        reason = jnp.where((reason == OK) & small, COS_SUM, reason).astype(jnp.int8)
        weighted = jnp.matmul(unit, shared["projection"], precision=HIGHEST)
        return weighted / jnp.where(reason == OK, total, 1.0)[:, None], reason
    if strategy == "omp":
        target = jnp.where(bad[:, None], 0.0, helper)
        support, coef = omp_coefficients(target, shared["overlap_atoms"], shared["overlap_helper"], opts.omp_k)
        picked = shared["overlap"][support]
        if opts.center_helper:  # the affine version: offsets from the shared rows' means on both sides
            fallback = shared["fallback"]
            return fallback + jnp.einsum("bk,bkd->bd", coef, picked - fallback, precision=HIGHEST), reason
        return jnp.einsum("bk,bkd->bd", coef, picked, precision=HIGHEST), reason
    cos = jnp.matmul(jnp.where(bad[:, None], 0.0, unit), shared["overlap_helper"].T, precision=HIGHEST)
    if strategy == "clp-topk":
        values, index = jax.lax.top_k(cos, opts.top_k)
        weights = jax.nn.softmax(values / opts.temperature, axis=-1)
        return jnp.einsum("bk,bkd->bd", weights, shared["overlap"][index], precision=HIGHEST), reason
    if strategy == "clp-sparsemax":
        return jnp.matmul(sparsemax(cos / opts.temperature), shared["overlap"], precision=HIGHEST), reason
    raise ValueError(f"no block weights for strategy {strategy!r}")


def fvt_block(pieces: jax.Array, table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FVT rows [B, D]: the mean of each token's source pieces (``pieces`` [B, P] rows of ``table``, -1 pads).

    A token with no pieces gets reason ``NO_PIECES``.
    """
    valid = pieces >= 0
    count = jnp.sum(valid, axis=-1)
    gathered = jnp.where(valid[..., None], table[jnp.maximum(pieces, 0)], 0.0)
    rows = jnp.sum(gathered, axis=1) / jnp.maximum(count, 1)[:, None].astype(jnp.float32)
    return rows, jnp.where(count > 0, OK, NO_PIECES).astype(jnp.int8)


def segment_norms(rows: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """Norm of each source matrix's slice of concatenated rows [B, sum(widths)] -> [B, len(widths)]."""
    edges = [sum(widths[:i]) for i in range(len(widths) + 1)]
    return jnp.stack([jnp.sqrt(jnp.sum(rows[:, a:b] ** 2, axis=-1)) for a, b in zip(edges[:-1], edges[1:])], -1)


def condition_rows(
    rows: jax.Array, reason: jax.Array, shared: dict[str, jax.Array], widths: tuple[int, ...], match_norms: bool,
) -> tuple[jax.Array, jax.Array]:
    """Flag rows longer than ``norm_cap`` (per matrix) or not finite, give every flagged row the fallback,
    and with ``match_norms`` rescale each matrix's slice to ``target_norm``; returns rows and reasons."""
    long = jnp.any(segment_norms(rows, widths) > shared["norm_cap"], axis=-1) | ~jnp.all(jnp.isfinite(rows), -1)
    reason = jnp.where((reason == OK) & long, NORM, reason).astype(jnp.int8)
    rows = jnp.where((reason == OK)[:, None], rows, shared["fallback"][None, :])
    if match_norms:
        norms = segment_norms(rows, widths)
        scale = jnp.where(norms > 0, shared["target_norm"] / jnp.where(norms > 0, norms, 1.0), 1.0)
        rows = rows * jnp.repeat(scale, jnp.asarray(widths), axis=1, total_repeat_length=sum(widths))
    return rows, reason
