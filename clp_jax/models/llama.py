"""Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): HF config and weight names <-> our tree."""

from __future__ import annotations

from typing import Any

from clp_jax.models.config import TransformerConfig
from clp_jax.models.weights import WeightSpec, copy, reshaped, torch_linear

MODEL_TYPES = ("llama", "mistral", "qwen2")
BASE_PREFIX = "model."
_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _rope(hf: Any) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    theta = float(params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    return theta, (tuple(sorted(params.items())) if kind != "default" else None)


def from_hf(hf: Any) -> TransformerConfig:
    if hf.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {hf.hidden_act!r} is not supported")
    qwen = hf.model_type == "qwen2"
    if qwen and getattr(hf, "use_sliding_window", False):
        raise ValueError("Qwen2 use_sliding_window=true is not supported")
    theta, scaling = _rope(hf)
    heads = hf.num_attention_heads
    bias = bool(getattr(hf, "attention_bias", False))
    return TransformerConfig(
        arch="llama", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=heads, num_kv_heads=hf.num_key_value_heads or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        intermediate_size=hf.intermediate_size, norm="rmsnorm", norm_eps=hf.rms_norm_eps, norm_bias=False,
        activation=_ACTIVATIONS[hf.hidden_act], gated_mlp=True, position="rope",
        max_position_embeddings=hf.max_position_embeddings, rope_theta=theta, rope_scaling=scaling,
        qkv_bias=qwen or bias, out_bias=bias and not qwen, mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        sliding_window=None if qwen else getattr(hf, "sliding_window", None),
        initializer_range=hf.initializer_range,
    )


def to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[cfg.activation]
    rope = {"rope_type": "default", **dict(cfg.rope_scaling or ()), "rope_theta": cfg.rope_theta}
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.norm_eps, hidden_act=act, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
    )


def weight_specs(cfg: TransformerConfig) -> list[WeightSpec]:
    e, h, kv, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    specs = [copy("embed_tokens.weight", "embed/embedding")]
    for i in range(cfg.num_layers):
        hf, p = f"layers.{i}.", f"layers_{i}/"
        specs += [copy(hf + "input_layernorm.weight", p + "attn_norm/scale")]
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            proj = hf + f"self_attn.{name}_proj"
            specs.append(torch_linear(proj + ".weight", p + f"attn/{name}/kernel", (e,), (heads, d)))
            if cfg.qkv_bias:
                specs.append(reshaped(proj + ".bias", p + f"attn/{name}/bias", (heads, d)))
        specs.append(torch_linear(hf + "self_attn.o_proj.weight", p + "attn/o/kernel", (h, d), (e,)))
        if cfg.out_bias:
            specs.append(copy(hf + "self_attn.o_proj.bias", p + "attn/o/bias"))
        specs.append(copy(hf + "post_attention_layernorm.weight", p + "mlp_norm/scale"))
        for hf_name, ours, shapes in (("gate_proj", "gate", ((e,), (m,))), ("up_proj", "up", ((e,), (m,))),
                                      ("down_proj", "down", ((m,), (e,)))):
            specs.append(torch_linear(hf + f"mlp.{hf_name}.weight", p + f"mlp/{ours}/kernel", *shapes))
            if cfg.mlp_bias:
                specs.append(copy(hf + f"mlp.{hf_name}.bias", p + f"mlp/{ours}/bias"))
    specs.append(copy("norm.weight", "final_norm/scale"))
    if not cfg.tie_word_embeddings:
        specs.append(torch_linear("lm_head.weight", "lm_head/kernel", (e,), (cfg.vocab_size,), top_level=True))
    return specs
