"""Next-token cross-entropy fused with the output layer, a chunk of positions at a time.

The [B, T, vocab] logits of a large-vocabulary model (BLOOM: 250,880 entries) are often the largest
activation of a step. Here they exist for ``chunk`` positions at a time: each chunk's logits give its nll
and, in the same pass, its gradients d(hidden) = G W and dW += G^T hidden with G = weight * (softmax -
onehot), so the backward pass only scales the stored gradients by the incoming cotangent (times
1 - tanh^2 under Gemma's logit soft-cap). Without a gradient (eval) only the nll is computed. The matmul
FLOPs equal those of the plain formulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from clp_jax.models.embedding import vocab_mesh_axes, vocab_parallel
from clp_jax.models.layers import softcap
from clp_jax.sharding import constrain, logical_to_spec

Array = jax.Array


def token_targets(tokens: Array, segment_ids: Array) -> tuple[Array, Array]:
    """Next-token targets: targets ``tokens[:, t + 1]`` and float32 weights (same segment, not padding)."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same = (segment_ids[:, :-1] != 0) & (segment_ids[:, 1:] == segment_ids[:, :-1])
    weights = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1).astype(jnp.float32)
    return targets, weights


def weighted_nll_sum(hidden: Array, w: Array, targets: Array, weights: Array, chunk: int | None = None,
                     vocab_major: bool = True, softcap: float | None = None) -> Array:
    """Sum over positions of ``weights * (logsumexp(logits) - logits[target])``, float32.

    hidden [B, T, E] (final-normed), w the output layer ([vocab, E] when ``vocab_major``, the tied embedding
    table; else [E, vocab]), targets int [B, T], weights float [B, T]. Logits are float32, soft-capped to
    ``softcap * tanh(logits / softcap)`` when given (the model's ``final_softcap``), and exist for ``chunk``
    positions at a time (all T when None; T is padded to a multiple); positions with weight 0 contribute nothing.
    """
    t = hidden.shape[1]
    chunk = t if chunk is None else max(1, min(chunk, t))
    split = _split_vocab(hidden, w, vocab_major)
    return _nll_sum(hidden, w, targets, weights.astype(jnp.float32), chunk, vocab_major, softcap, split)


def row_nll_sums(hidden: Array, w: Array, targets: Array, weights: Array, chunk: int | None = None,
                 vocab_major: bool = True, softcap: float | None = None) -> Array:
    """``weighted_nll_sum`` of each row [B], float32: per-document sums for evaluation."""
    def one(h: Array, t: Array, wt: Array) -> Array:
        return weighted_nll_sum(h[None], w, t[None], wt[None], chunk, vocab_major, softcap)
    return jax.vmap(one)(hidden, targets, weights)


def _chunks(x: Array, chunk: int) -> Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...], padding T with zeros to a multiple of ``chunk``."""
    b, t = x.shape[:2]
    pad = -t % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, (t + pad) // chunk, chunk, *x.shape[2:]), 1, 0)


def _chunked(chunk: int, *xs: Array) -> tuple[Array, ...]:
    return tuple(_chunks(x, chunk) for x in xs)


LOGITS_AXES = ("batch", "length", "vocab")


def _split_vocab(hidden: Array, w: Array, vocab_major: bool) -> bool:
    """Whether the loss splits over the vocabulary: the output layer's rows are split and a batch group's hidden
    states, all positions (XLA gathers them for the whole loop at once), are fewer than its rows."""
    vocab = w.shape[0] if vocab_major else w.shape[1]
    mesh = jax.sharding.get_abstract_mesh()
    return vocab_parallel(mesh, vocab_mesh_axes(mesh, vocab), vocab, *hidden.shape[:2])


def _logits(h: Array, w: Array, vocab_major: bool, cap: float | None, split: bool) -> Array:
    """A chunk's float32 logits. With ``split`` (``_split_vocab``) the logits split over the vocabulary like the
    table (its dim claims mesh axes first) and the batch over what is left: each device multiplies its rows of
    the table by its batch group's hidden states, so neither the table nor a whole-table gradient is gathered."""
    vocab = w.shape[0] if vocab_major else w.shape[1]
    mesh = jax.sharding.get_abstract_mesh()
    first = 2 if split else None
    if first is not None:
        spec = logical_to_spec(LOGITS_AXES, (*h.shape[:2], vocab), mesh, first=first)
        h = jax.lax.with_sharding_constraint(h, PartitionSpec(spec[0], spec[1], None))
    logits = jnp.einsum("bce,ve->bcv" if vocab_major else "bce,ev->bcv", h, w, preferred_element_type=jnp.float32)
    return softcap(constrain(logits, LOGITS_AXES, first=first), cap)


def _chunk_nll(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """Per-position nll and logsumexp of one chunk's float32 logits."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.where(weights != 0, (lse - picked) * weights, 0.0), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _nll_sum(hidden: Array, w: Array, targets: Array, weights: Array, chunk: int, vocab_major: bool,
             cap: float | None, split: bool) -> Array:
    def body(total: Array, xs: tuple) -> tuple[Array, None]:
        h, tgt, wt = xs
        nll, _ = _chunk_nll(_logits(h, w, vocab_major, cap, split), tgt, wt)
        return total + jnp.sum(nll), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunked(chunk, hidden, targets, weights))
    return total


def _nll_sum_fwd(hidden: Array, w: Array, targets: Array, weights: Array, chunk: int, vocab_major: bool,
                 cap: float | None, split: bool) -> tuple:
    def body(carry: tuple, xs: tuple) -> tuple[tuple, Array]:
        total, dw = carry
        h, tgt, wt = xs
        logits = _logits(h, w, vocab_major, cap, split)
        nll, lse = _chunk_nll(logits, tgt, wt)
        probs = jnp.exp(logits - lse[..., None])
        onehot = jnp.arange(logits.shape[-1]) == tgt[..., None]
        g = (probs - onehot) * wt[..., None]
        if cap is not None:  # logits = cap * tanh(raw / cap): d/draw = 1 - (logits / cap)^2
            g = g * (1.0 - jnp.square(logits / cap))
        g = jnp.where((wt != 0)[..., None], g, 0.0).astype(h.dtype)
        dh = jnp.einsum("bcv,ve->bce" if vocab_major else "bcv,ev->bce", g, w, preferred_element_type=jnp.float32)
        # dW is accumulated as [E, vocab] = h^T G: the transpose this product needs falls on h, not on G.
        dw = dw + jnp.einsum("bce,bcv->ev", h, g, preferred_element_type=jnp.float32)
        # Accumulate dW sharded like the parameter, not replicated (a full float32 copy of a 250k-row table).
        dw = constrain(dw, ("embed", "vocab"), first=1)
        return (total + jnp.sum(nll), dw), constrain(dh.astype(h.dtype), ("batch", "length", "embed"))

    e_by_v = (w.shape[1], w.shape[0]) if vocab_major else w.shape
    init = (jnp.zeros((), jnp.float32), jnp.zeros(e_by_v, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, _chunked(chunk, hidden, targets, weights))
    dw = dw.T if vocab_major else dw
    b, t = hidden.shape[:2]
    dh = jnp.moveaxis(dh, 0, 1).reshape(b, -1, hidden.shape[-1])[:, :t]
    return total, (dh, dw.astype(w.dtype))


def _nll_sum_bwd(chunk: int, vocab_major: bool, cap: float | None, split: bool, res: tuple, ct: Array) -> tuple:
    dh, dw = res
    return (ct * dh).astype(dh.dtype), (ct * dw).astype(dw.dtype), None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)
