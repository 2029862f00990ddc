"""Gemma 3 text models (Gemma3ForCausalLM) and Gemma 2 (Gemma2ForCausalLM): HF config <-> our config.

Gemma is Llama's layout plus norms on each block output, (1 + w) RMSNorm, GeGLU, embeddings scaled by
sqrt(hidden_size), attention scaled by query_pre_attn_scalar, and sliding-window layers between global ones.
Gemma 2 soft-caps attention scores and logits; Gemma 3 adds q/k norms and gives sliding layers their own
unscaled RoPE base. The tensor names are Llama's plus the extra norms, so ``llama.weight_specs`` maps them.
"""

from __future__ import annotations

from typing import Any

from clp_jax.models import llama
from clp_jax.models.config import TransformerConfig
from clp_jax.models.weights import WeightSpec

MODEL_TYPES = ("gemma3_text", "gemma2")
BASE_PREFIX = "model."


def _local_theta(params: dict[str, Any]) -> float:
    """Gemma 3's sliding-layer RoPE base; those layers take no scaling."""
    local = dict(params.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"sliding_attention rope_type {local['rope_type']!r} is not supported (supported: default)")
    return float(local.get("rope_theta", 10000.0))


def from_hf(hf: Any) -> TransformerConfig:
    if hf.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {hf.model_type!r} is not supported; use the text model "
                         "(model_type gemma3_text, Gemma3ForCausalLM)")
    if hf.hidden_activation not in llama.HF_ACTIVATIONS.values():
        raise ValueError(f"hidden_activation {hf.hidden_activation!r} is not supported")
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=true is not supported")
    gemma3 = hf.model_type == "gemma3_text"
    activation = next(k for k, v in llama.HF_ACTIVATIONS.items() if v == hf.hidden_activation)
    params = hf.rope_parameters
    theta, scaling = llama.rope_from_hf(params["full_attention"] if gemma3 else params)
    window, sliding_layers = llama.windows_from_hf(hf)
    bias = bool(hf.attention_bias)
    scale_dim = hf.query_pre_attn_scalar
    return TransformerConfig(
        arch="gemma3", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim,
        intermediate_size=hf.intermediate_size, norm="rmsnorm_plus_one", norm_eps=hf.rms_norm_eps, norm_bias=False,
        activation=activation, gated_mlp=True, position="rope", max_position_embeddings=hf.max_position_embeddings,
        rope_theta=theta, rope_scaling=scaling, local_rope_theta=_local_theta(params) if gemma3 else None,
        qkv_bias=bias, out_bias=bias, tie_word_embeddings=bool(hf.tie_word_embeddings), sliding_window=window,
        sliding_layers=sliding_layers, qk_norm=gemma3, post_norms=True, embed_scale=True,
        attn_scale_dim=None if scale_dim == hf.head_dim else scale_dim,
        # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it.
        attn_softcap=None if gemma3 else hf.attn_logit_softcapping, final_softcap=hf.final_logit_softcapping,
        initializer_range=hf.initializer_range,
    )


def to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    rope = llama.rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
    data = dict(
        model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.norm_eps, hidden_activation=llama.HF_ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope, attention_bias=cfg.qkv_bias,
        query_pre_attn_scalar=cfg.attn_scale_dim or cfg.head_dim, sliding_window=cfg.sliding_window,
        layer_types=llama.hf_layer_types(cfg), attn_logit_softcapping=cfg.attn_softcap,
        final_logit_softcapping=cfg.final_softcap, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
    )
    if cfg.qk_norm:
        local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
        data.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                    rope_parameters={"full_attention": rope, "sliding_attention": local})
    return data


def weight_specs(cfg: TransformerConfig) -> list[WeightSpec]:
    return llama.weight_specs(cfg)
