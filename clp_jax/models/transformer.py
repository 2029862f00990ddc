"""The Flax decoder shared by GPT-2, Llama-family, BLOOM and Gemma models; configs decide the differences.

Parameter tree (plain nested dicts), the same for every architecture:
  embed/embedding [vocab, embed]; pos_embed/embedding (learned positions); embed_norm (BLOOM);
  layers_{i}/{attn_norm, attn/{q,k,v,o, q_norm?, k_norm?}, attn_post_norm?, mlp_norm, mlp/{up, gate?, down},
  mlp_post_norm?}; final_norm; lm_head/kernel [embed, vocab] when embeddings are untied.
Layers differ only by their sliding window and RoPE base (``cfg.layer_window``, ``cfg.layer_rope``).
Attention runs in the kernel ``cfg.attention`` chooses (``models.attention``). Remat (``cfg.remat``) keeps what
its policy names of each layer: query_proj, key_proj, value_proj, context (attention output), out_proj,
mlpwi (mlpwi_0 gate, mlpwi_1 up when gated), mlpwo: MaxText's names for the same tensors.

Decoding with a KV cache (``models.init_cache``): the cache holds per-layer k/v [B, L, KV, D] and the
position of the token in each slot [B, L] (-1: empty or padding). A call writes its T tokens at slots
``cache_index .. cache_index + T`` and attends to every written slot whose position is not after the
query's, so rows may start at different slots (left padding) and still count positions from 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from clp_jax.models import attention
from clp_jax.models.config import TransformerConfig
from clp_jax.models.embedding import lookup
from clp_jax.models.layers import (
    Norm,
    activation,
    alibi_slopes,
    apply_rope,
    attention_mask,
    cache_attention_mask,
    param,
    rope_inv_freq,
    softcap,
)
from clp_jax.sharding import constrain

Array = jax.Array
Cache = dict
# The residual stream's logical axes: batch-sharded, embed replicated where the batch already takes fsdp.
RESIDUAL_AXES = ("batch", "length", "embed")


class Dense(nn.Module):
    """x @ kernel (+ bias) contracting the last ``len(in_axes)`` dims; kernel shape in_shape + out_shape."""

    cfg: TransformerConfig
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool
    init_scale: float = 1.0
    f32_output: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        init = nn.initializers.normal(cfg.initializer_range * self.init_scale)
        w = param(self, "kernel", init, self.in_shape + self.out_shape, self.in_axes + self.out_axes,
                  cfg.weight_dtype)
        # One 2-D matmul over flattened dims: its backward pass is two plain matmuls too, where a multi-dim
        # dot_general makes XLA:CPU transpose the incoming gradient (re-fusing its whole producer chain).
        k, n = math.prod(self.in_shape), math.prod(self.out_shape)
        lead = x.shape[:x.ndim - len(self.in_shape)]
        y = jnp.dot(x.reshape(-1, k), w.astype(cfg.compute_dtype).reshape(k, n), preferred_element_type=jnp.float32)
        y = y.reshape(*lead, *self.out_shape)
        if self.use_bias:
            b = param(self, "bias", nn.initializers.zeros, self.out_shape, self.out_axes, cfg.weight_dtype)
            y = y + b.astype(jnp.float32)
        return y if self.f32_output else y.astype(cfg.compute_dtype)


class Attention(nn.Module):
    cfg: TransformerConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array | None, bias: Array | None, segment_ids: Array,
                 cache: Cache | None = None, cache_index: Array | None = None) -> tuple[Array, Cache | None]:
        cfg = self.cfg
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Dense(cfg, (e,), (h, d), ("embed",), ("heads", "head_dim"), cfg.qkv_bias, name="q")(x)
        k = Dense(cfg, (e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, name="k")(x)
        v = Dense(cfg, (e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, name="v")(x)
        q, k, v = (checkpoint_name(a, n) for a, n in ((q, "query_proj"), (k, "key_proj"), (v, "value_proj")))
        if cfg.qk_norm:
            q, k = Norm(cfg, name="q_norm")(q), Norm(cfg, name="k_norm")(k)
        if cfg.position == "rope":
            inv = rope_inv_freq(d, *cfg.layer_rope(self.layer_idx))
            q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
        if cache is not None:
            at = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
            cache = {"k": k, "v": v}
        scale = (cfg.attn_scale_dim or d) ** -0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        impl = "xla" if cache is not None else cfg.attention
        out = attention.attend(impl, q, k, v, mask, bias, segment_ids, scale, cfg.attn_softcap,
                               cfg.layer_window(self.layer_idx))
        out = checkpoint_name(out, attention.CONTEXT)
        out = Dense(cfg, (h, d), (e,), ("heads", "head_dim"), ("embed",), cfg.out_bias,
                    init_scale=(2 * cfg.num_layers) ** -0.5, name="o")(out)
        return checkpoint_name(out, "out_proj"), cache


class Mlp(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        e, m = cfg.hidden_size, cfg.intermediate_size
        up = Dense(cfg, (e,), (m,), ("embed",), ("mlp",), cfg.mlp_bias, name="up")(x)
        if cfg.gated_mlp:
            gate = Dense(cfg, (e,), (m,), ("embed",), ("mlp",), cfg.mlp_bias, name="gate")(x)
            hidden = activation(cfg.activation, checkpoint_name(gate, "mlpwi_0")) * checkpoint_name(up, "mlpwi_1")
        else:
            hidden = activation(cfg.activation, checkpoint_name(up, "mlpwi"))
        down = Dense(cfg, (m,), (e,), ("mlp",), ("embed",), cfg.mlp_bias,
                     init_scale=(2 * cfg.num_layers) ** -0.5, name="down")(hidden)
        return checkpoint_name(down, "mlpwo")


class Block(nn.Module):
    """Pre-norm residual block; BLOOM may take the residual from the normed input, Gemma norms each output."""

    cfg: TransformerConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array | None, bias: Array | None, segment_ids: Array,
                 cache: Cache | None = None, cache_index: Array | None = None) -> tuple[Array, Cache | None]:
        cfg = self.cfg
        h = Norm(cfg, name="attn_norm")(x)
        a, cache = Attention(cfg, self.layer_idx, name="attn")(h, positions, mask, bias, segment_ids, cache,
                                                               cache_index)
        if cfg.post_norms:
            a = Norm(cfg, name="attn_post_norm")(a)
        x = (h if cfg.residual_from_norm else x) + a
        h = Norm(cfg, name="mlp_norm")(x)
        m = Mlp(cfg, name="mlp")(h)
        if cfg.post_norms:
            m = Norm(cfg, name="mlp_post_norm")(m)
        return (h if cfg.residual_from_norm else x) + m, cache


class Transformer(nn.Module):
    """Decoder-only LM: token ids [B, T] -> logits [B, T, vocab] in float32.

    With ``cache`` (and ``cache_index``, the slot of the first token) it returns ``(logits, new_cache)``;
    ``last_only`` keeps only the last position's logits [B, 1, vocab].
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                 return_hidden: bool = False, cache: Cache | None = None, cache_index: Array | None = None,
                 last_only: bool = False) -> Array | tuple[Array, Cache]:
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), dtype=jnp.int32)
        embedding = _Embed(cfg, name="embed")
        x = embedding(tokens)
        if cfg.embed_scale:  # HF rounds sqrt(hidden_size) to the compute dtype first
            x = x * jnp.asarray(cfg.hidden_size**0.5, cfg.compute_dtype)
        if cfg.position == "learned":
            x = x + _Embed(cfg, rows=cfg.max_position_embeddings, axis=None, name="pos_embed")(positions)
        if cfg.embed_norm:
            x = Norm(cfg, name="embed_norm")(x)
        x = constrain(x, RESIDUAL_AXES)
        windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
        if cache is None:
            # The kernel for this platform (a ClpError line when it cannot run); init only needs the shapes.
            platform = "cpu" if self.is_initializing() else attention.current_platform()
            cfg = attention.resolve(cfg.replace(attention="xla") if self.is_initializing() else cfg, platform, t)
            key_positions = positions
            dense = cfg.attention != "splash"
            masks = {w: attention_mask(segment_ids, positions, w) if dense else None for w in dict.fromkeys(windows)}
        else:
            written = jnp.where(segment_ids != 0, positions, -1).astype(jnp.int32)
            key_positions = jax.lax.dynamic_update_slice(cache["positions"], written, (0, cache_index))
            masks = {w: cache_attention_mask(positions, key_positions, w) for w in dict.fromkeys(windows)}
        bias = None
        if cfg.position == "alibi":
            slopes = jnp.asarray(alibi_slopes(cfg.num_heads))
            bias = slopes[None, :, None, None] * key_positions[:, None, None, :].astype(jnp.float32)
        block = Block if cfg.remat == "none" or cache is not None else nn.remat(Block, policy=remat_policy(cfg.remat))
        layer_caches = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            x, layer_cache = block(cfg, i, name=f"layers_{i}")(x, positions, masks[windows[i]], bias, segment_ids,
                                                               layer_cache, cache_index)
            x = constrain(x, RESIDUAL_AXES)
            layer_caches.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        x = Norm(cfg, name="final_norm")(x)
        if return_hidden:
            out = x
        elif cfg.tie_word_embeddings:
            out = embedding.attend(x)
        else:
            out = Dense(cfg, (cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",), False,
                        f32_output=True, name="lm_head")(x)
        if not return_hidden:
            out = softcap(out, cfg.final_softcap)
        if cache is None:
            return out
        return out, {"positions": key_positions, "layers": layer_caches}


# What each remat policy keeps (MaxText's meanings); "full" keeps nothing, "none" is no remat at all.
_PROJECTIONS = ("query_proj", "key_proj", "value_proj")
_MLP_IN = ("mlpwi", "mlpwi_0", "mlpwi_1")
REMAT_SAVES: dict[str, tuple[str, ...]] = {
    "full": (),
    "minimal": (*_PROJECTIONS, "out_proj", *_MLP_IN, "mlpwo"),
    "minimal_with_context": (*_PROJECTIONS, attention.CONTEXT, "out_proj", *_MLP_IN, "mlpwo"),
    "save_dot_with_context_except_mlp": (*_PROJECTIONS, attention.CONTEXT, "out_proj"),
    "save_dot_except_mlpwi": (*_PROJECTIONS, "out_proj", "mlpwo"),
    "save_dot_except_mlp": (*_PROJECTIONS, "out_proj"),
    "save_qkv_proj": _PROJECTIONS,
}


def remat_policy(name: str) -> Callable[..., bool]:
    """The ``jax.checkpoint`` policy of remat policy ``name``: save only the intermediates it names."""
    saves = REMAT_SAVES[name]
    return jax.checkpoint_policies.save_only_these_names(*saves) if saves else jax.checkpoint_policies.nothing_saveable


class _Embed(nn.Module):
    """Embedding table [rows, embed]; ``attend`` gives float32 logits against it (tied output)."""

    cfg: TransformerConfig
    rows: int | None = None
    axis: str | None = "vocab"

    def setup(self) -> None:
        cfg = self.cfg
        self.embedding = param(self, "embedding", nn.initializers.normal(cfg.initializer_range),
                               (self.rows or cfg.vocab_size, cfg.hidden_size), (self.axis, "embed"),
                               cfg.weight_dtype)

    def __call__(self, ids: Array) -> Array:
        return lookup(self.embedding, ids, (self.axis, "embed"), self.cfg.compute_dtype)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("bte,ve->btv", x, self.embedding.astype(self.cfg.compute_dtype),
                          preferred_element_type=jnp.float32)

