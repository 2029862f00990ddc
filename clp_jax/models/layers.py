"""Building blocks shared by every architecture: norms, positions (RoPE, ALiBi), masks, attention."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clp_jax.models.config import TransformerConfig

Array = jax.Array


def param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype: Any) -> Array:
    """A parameter carrying logical axis names (read back by ``models.param_axes``)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim, computed in float32 like Hugging Face, returned in the compute dtype."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        e = x.shape[-1]
        plus_one = cfg.norm == "rmsnorm_plus_one"
        init = nn.initializers.zeros if plus_one else nn.initializers.ones
        scale = param(self, "scale", init, (e,), ("norm",), cfg.weight_dtype)
        h = x.astype(jnp.float32)
        if plus_one:  # Gemma: the (1 + w) weight is applied in float32, then cast
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps)
            return (h * (1.0 + scale.astype(jnp.float32))).astype(cfg.compute_dtype)
        if cfg.norm == "rmsnorm":
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps)
            # HF casts back to the input dtype before applying the weight.
            return scale.astype(cfg.compute_dtype) * h.astype(cfg.compute_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (e,), ("norm",), cfg.weight_dtype) if cfg.norm_bias else None
        return _layer_norm(x, scale, bias, cfg.norm_eps, cfg.compute_dtype)


# LayerNorm with a hand-written VJP: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale, two
# row sums and one elementwise pass, where XLA's derivative of the forward graph makes several more passes.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x: Array, scale: Array, bias: Array | None, eps: float, dtype: Any) -> Array:
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x: Array, scale: Array, bias: Array | None, eps: float, dtype: Any) -> tuple:
    h = x.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True) + eps)
    y = (h - mean) * rstd * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps: float, dtype: Any, res: tuple, dy: Array) -> tuple:
    x, mean, rstd, scale, bias = res
    dy = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    dscale = jnp.sum(dy * xhat, axis=rows).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(dy, axis=rows).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def rope_inv_freq(d: int, theta: float, rope_scaling: tuple[tuple[str, Any], ...] | None) -> np.ndarray:
    """RoPE inverse frequencies (float32) for head dim ``d``, with linear or Llama-3 scaling when given."""
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    scaling = dict(rope_scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    return inv.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate [B, T, H, D] by positions [B, T] in HF's rotate-half layout."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al.), including BLOOM's rule for non-power-of-2 head counts."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base ** p for p in range(1, 1 + 2 * remaining, 2)]
    return np.asarray(slopes, dtype=np.float32)


def attention_mask(segment_ids: Array, positions: Array, sliding_window: int | None) -> Array:
    """[B, 1, Tq, Tk] boolean: causal, same document, real (segment != 0) keys, optional window."""
    q_seg, k_seg = segment_ids[:, :, None], segment_ids[:, None, :]
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    mask = causal & (q_seg == k_seg) & (k_seg != 0)
    if sliding_window is not None:
        dist = positions[:, :, None] - positions[:, None, :]
        mask &= dist < sliding_window
    return mask[:, None]


def cache_attention_mask(q_positions: Array, k_positions: Array, sliding_window: int | None) -> Array:
    """[B, 1, Tq, L] boolean for attention into a KV cache: written keys (position >= 0) not after the query."""
    q, k = q_positions[:, :, None], k_positions[:, None, :]
    mask = (k >= 0) & (k <= q)
    if sliding_window is not None:
        mask &= q - k < sliding_window
    return mask[:, None]


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, bias: Array | None, scale: float,
                          softcap: float | None = None) -> Array:
    """Grouped-query attention; q [B,T,H,D], k/v [B,S,KV,D], mask [B,1,T,S], bias [B,H,1|T,S]; float32 softmax.

    Scores are ``q k * scale``, soft-capped to ``softcap * tanh(scores / softcap)`` when given, plus ``bias``.
    A custom VJP keeps the backward pass to the four matmuls and one elementwise pass of the textbook
    formula (dS = P * (dP - rowsum(dO * O)), times 1 - tanh^2 under a soft cap); XLA's derivative of the
    softmax graph makes more passes over the [T, S] scores, which dominate attention time on CPU.
    """
    return _attention(q, k, v, mask, bias, scale, softcap)


# Layout: the G query heads sharing a k/v head are stacked as rows, [B, KV, G * T, D], so every product is a
# 4-D batched matmul whose operands XLA:CPU can read in place; where one operand must be transposed, each
# einsum below puts that transpose on a [T, D] operand, never on the [T, S] scores.

def _rows_major(x: Array, kv: int) -> Array:
    """[B, T, H, D] -> [B, KV, G * T, D], row g * T + t holding head kv * G + g (Hugging Face's grouping)."""
    b, t, h, d = x.shape
    return x.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, h // kv * t, d)


def _heads_last(x: Array, t: int) -> Array:
    """The inverse of ``_rows_major``: [B, KV, G * T, D] -> [B, T, H, D]."""
    b, kv, r, d = x.shape
    return x.reshape(b, kv, r // t, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * (r // t), d)


def _grouped(x: Array, kv: int, g: int, t: int) -> Array:
    """A [B, 1|H, 1|T, S] mask or bias, broadcasting against grouped [B, KV, G * T, S] scores."""
    if g == 1:
        return x
    b, h, tx, s = x.shape
    x = x[:, :, None] if h == 1 else x.reshape(b, kv, g, tx, s)
    return jnp.broadcast_to(x, (b, x.shape[1], g, t, s)).reshape(b, x.shape[1], g * t, s)


def _attention_fwd(q: Array, k: Array, v: Array, mask: Array, bias: Array | None, scale: float,
                   softcap: float | None) -> tuple:
    t, h, kv = q.shape[1], q.shape[2], k.shape[2]
    # The scale goes on q ([T, D]) rather than on the [T, S] scores; dK then comes straight from scaled q.
    qh = _rows_major((q.astype(jnp.float32) * scale).astype(q.dtype), kv)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkrd,bksd->bkrs", qh, kh, preferred_element_type=jnp.float32)
    capped = None
    if softcap is not None:
        capped = jnp.tanh(scores / softcap)
        scores = capped * softcap
    if bias is not None:
        scores = scores + _grouped(bias, kv, h // kv, t)
    # The mask goes in as an additive bias, not a select: XLA:CPU can fuse an add, not a select on an iota
    # mask, into the softmax kernel (one pass fewer over the scores). Masked scores round to exactly min.
    scores = scores + jnp.where(_grouped(mask, kv, h // kv, t), 0.0, jnp.finfo(jnp.float32).min)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("bkrs,bksd->bkrd", probs.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    out = out.astype(v.dtype)
    # Queries that see no key at all (padding) get uniform probs; their scores still get no gradient.
    seen = _grouped(jnp.any(mask, axis=-1, keepdims=True), kv, h // kv, t)
    return _heads_last(out, t), (qh, kh, vh, seen, probs, out, capped)


def _attention_bwd(scale: float, softcap: float | None, res: tuple, d_out: Array) -> tuple:
    qh, kh, vh, seen, probs, out, capped = res
    kv, t = kh.shape[1], d_out.shape[1]
    do = _rows_major(d_out, kv)
    p = probs.astype(vh.dtype)
    dv = jnp.einsum("bkrd,bkrs->bskd", do, p, preferred_element_type=jnp.float32)
    # Masked keys of a query that sees any key have probs exactly 0; a query that sees none (padding) has
    # uniform probs, and its scores get no gradient through dO zeroed on its row ([T, D], not [T, S]).
    do_seen = do * seen.astype(do.dtype)
    dp = jnp.einsum("bkrd,bksd->bkrs", do_seen, vh, preferred_element_type=jnp.float32)
    rowsum = jnp.sum(do_seen.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = probs * (dp - rowsum)
    if capped is not None:  # d/dx c * tanh(x / c) = 1 - tanh(x / c)^2
        ds = ds * (1.0 - capped * capped)
    ds = ds.astype(qh.dtype)
    dq = jnp.einsum("bkrs,bksd->bkrd", ds, kh, preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("bkrd,bkrs->bskd", qh, ds, preferred_element_type=jnp.float32)
    return (_heads_last(dq, t).astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None)


_attention = jax.custom_vjp(
    lambda q, k, v, mask, bias, scale, softcap: _attention_fwd(q, k, v, mask, bias, scale, softcap)[0],
    nondiff_argnums=(5, 6))
_attention.defvjp(_attention_fwd, _attention_bwd)


def softcap(x: Array, cap: float | None) -> Array:
    """``cap * tanh(x / cap)`` (Gemma's logit soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def activation(name: str, x: Array) -> Array:
    """The MLP nonlinearity named in the config."""
    if name == "gelu_tanh":
        return _gelu_tanh(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def _gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation; its VJP is one elementwise pass (XLA's derivative of the graph makes two)."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_bwd(x: Array, dy: Array) -> tuple[Array]:
    h = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (h + 0.044715 * h * h * h))
    d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * h * h)
    return ((dy.astype(jnp.float32) * d).astype(x.dtype),)


_gelu_tanh.defvjp(lambda x: (_gelu_tanh(x), x), _gelu_tanh_bwd)
