"""Building blocks shared by every architecture: norms, positions (RoPE, ALiBi), masks, attention."""

from __future__ import annotations

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
    """LayerNorm or RMSNorm, computed in float32 like Hugging Face, returned in the compute dtype."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        e = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (e,), ("norm",), cfg.weight_dtype)
        h = x.astype(jnp.float32)
        if cfg.norm == "rmsnorm":
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps)
            # HF casts back to the input dtype before applying the weight.
            return scale.astype(cfg.compute_dtype) * h.astype(cfg.compute_dtype)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale.astype(jnp.float32)
        if cfg.norm_bias:
            h = h + param(self, "bias", nn.initializers.zeros, (e,), ("norm",), cfg.weight_dtype).astype(jnp.float32)
        return h.astype(cfg.compute_dtype)


def rope_inv_freq(cfg: TransformerConfig) -> np.ndarray:
    """RoPE inverse frequencies (float32), with linear or Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    scaling = dict(cfg.rope_scaling or ())
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


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, bias: Array | None, scale: float) -> Array:
    """Grouped-query attention; q [B,T,H,D], k/v [B,S,KV,D]; softmax in float32."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(b, h, t, -1)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, h // kv, t, -1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(v.dtype)


def activation(name: str, x: Array) -> Array:
    """The MLP nonlinearity named in the config."""
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")
