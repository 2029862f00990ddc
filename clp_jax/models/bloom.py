"""BLOOM (the CLP-Transfer paper's BLOOM-7b1 source; ALiBi, embedding LayerNorm): HF <-> our tree."""

from __future__ import annotations

from typing import Any

import numpy as np

from clp_jax.models.config import TransformerConfig
from clp_jax.models.weights import WeightSpec, copy, split, torch_linear

MODEL_TYPES = ("bloom",)
BASE_PREFIX = "transformer."


def from_hf(hf: Any) -> TransformerConfig:
    e, h = hf.hidden_size, hf.n_head
    return TransformerConfig(
        arch="bloom", vocab_size=hf.vocab_size, hidden_size=e, num_layers=hf.n_layer, num_heads=h,
        num_kv_heads=h, head_dim=e // h, intermediate_size=4 * e, norm="layernorm",
        norm_eps=hf.layer_norm_epsilon, activation="gelu_tanh", gated_mlp=False, position="alibi",
        qkv_bias=True, out_bias=True, mlp_bias=True, embed_norm=True,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        residual_from_norm=bool(hf.apply_residual_connection_post_layernorm),
        initializer_range=hf.initializer_range,
    )


def to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    return dict(
        model_type="bloom", architectures=["BloomForCausalLM"], vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        layer_norm_epsilon=cfg.norm_eps, apply_residual_connection_post_layernorm=cfg.residual_from_norm,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
    )


def _qkv(shape: tuple[int, ...]) -> tuple:
    """BLOOM fuses q, k, v per head: rows ordered [head, (q|k|v), head_dim]."""
    h, d = shape[0], shape[2]

    def to_parts(a: np.ndarray) -> tuple[np.ndarray, ...]:
        if a.ndim == 1:
            fused = a.reshape(h, 3, d)
            return tuple(np.ascontiguousarray(fused[:, t]) for t in range(3))
        fused = a.reshape(h, 3, d, -1)
        return tuple(np.ascontiguousarray(fused[:, t].transpose(2, 0, 1)) for t in range(3))

    def from_parts(*parts: np.ndarray) -> np.ndarray:
        if parts[0].ndim == 2:
            return np.stack(parts, axis=1).reshape(-1)
        fused = np.stack([p.transpose(1, 2, 0) for p in parts], axis=1)  # [h, 3, d, e]
        return np.ascontiguousarray(fused.reshape(h * 3 * d, -1))

    return to_parts, from_parts


def weight_specs(cfg: TransformerConfig) -> list[WeightSpec]:
    e, h, d, m = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    specs = [
        copy("word_embeddings.weight", "embed/embedding"),
        copy("word_embeddings_layernorm.weight", "embed_norm/scale"),
        copy("word_embeddings_layernorm.bias", "embed_norm/bias"),
    ]
    for i in range(cfg.num_layers):
        hf, p = f"h.{i}.", f"layers_{i}/"
        specs += [
            copy(hf + "input_layernorm.weight", p + "attn_norm/scale"),
            copy(hf + "input_layernorm.bias", p + "attn_norm/bias"),
            split(hf + "self_attention.query_key_value.weight", tuple(p + f"attn/{n}/kernel" for n in "qkv"),
                  *_qkv((h, 3, d))),
            split(hf + "self_attention.query_key_value.bias", tuple(p + f"attn/{n}/bias" for n in "qkv"),
                  *_qkv((h, 3, d))),
            torch_linear(hf + "self_attention.dense.weight", p + "attn/o/kernel", (h, d), (e,)),
            copy(hf + "self_attention.dense.bias", p + "attn/o/bias"),
            copy(hf + "post_attention_layernorm.weight", p + "mlp_norm/scale"),
            copy(hf + "post_attention_layernorm.bias", p + "mlp_norm/bias"),
            torch_linear(hf + "mlp.dense_h_to_4h.weight", p + "mlp/up/kernel", (e,), (m,)),
            copy(hf + "mlp.dense_h_to_4h.bias", p + "mlp/up/bias"),
            torch_linear(hf + "mlp.dense_4h_to_h.weight", p + "mlp/down/kernel", (m,), (e,)),
            copy(hf + "mlp.dense_4h_to_h.bias", p + "mlp/down/bias"),
        ]
    specs += [copy("ln_f.weight", "final_norm/scale"), copy("ln_f.bias", "final_norm/bias")]
    if not cfg.tie_word_embeddings:
        specs.append(torch_linear("lm_head.weight", "lm_head/kernel", (e,), (cfg.vocab_size,), top_level=True))
    return specs
