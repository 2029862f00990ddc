"""Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM): HF config and weight names <-> our tree."""

from __future__ import annotations

from typing import Any

from clp_jax.models.config import TransformerConfig
from clp_jax.models.weights import WeightSpec, copy, reshaped, torch_linear

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BASE_PREFIX = "model."
_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
HF_ACTIVATIONS = {v: k for k, v in _ACTIVATIONS.items()}
_LAYER_TYPES = ("sliding_attention", "full_attention")


def rope_from_hf(params: dict[str, Any] | None, default_theta: float = 10000.0
                 ) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling) of one HF ``rope_parameters`` dict; scaling None for the default kind."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", default_theta))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    return theta, (tuple(sorted(params.items())) if kind != "default" else None)


def rope_to_hf(theta: float, scaling: tuple[tuple[str, Any], ...] | None) -> dict[str, Any]:
    """The HF ``rope_parameters`` dict of (rope_theta, rope_scaling)."""
    return {"rope_type": "default", **dict(scaling or ()), "rope_theta": theta}


def windows_from_hf(hf: Any) -> tuple[int | None, tuple[bool, ...] | None]:
    """(sliding_window, sliding_layers) from HF ``sliding_window`` and per-layer ``layer_types`` (if any).

    Canonical, so that configs round-trip: no window when no layer slides, ``sliding_layers`` None when all do.
    """
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    if types is None:
        return window, None
    unknown = sorted(set(types) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported (supported: {', '.join(_LAYER_TYPES)})")
    sliding = tuple(t == "sliding_attention" for t in types)
    if window is None or not any(sliding):
        return None, None
    return window, None if all(sliding) else sliding


def hf_layer_types(cfg: TransformerConfig) -> list[str]:
    """HF ``layer_types``: which layers attend in a sliding window."""
    return ["sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.num_layers)]


def from_hf(hf: Any) -> TransformerConfig:
    if hf.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {hf.hidden_act!r} is not supported")
    qwen2, qwen3 = hf.model_type == "qwen2", hf.model_type == "qwen3"
    if qwen2 and getattr(hf, "use_sliding_window", False):
        raise ValueError("Qwen2 use_sliding_window=true is not supported")
    theta, scaling = rope_from_hf(getattr(hf, "rope_parameters", None), getattr(hf, "rope_theta", 10000.0))
    window, sliding_layers = (None, None) if qwen2 else windows_from_hf(hf)
    heads = hf.num_attention_heads
    bias = bool(getattr(hf, "attention_bias", False))
    return TransformerConfig(
        arch="llama", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=heads, num_kv_heads=hf.num_key_value_heads or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        intermediate_size=hf.intermediate_size, norm="rmsnorm", norm_eps=hf.rms_norm_eps, norm_bias=False,
        activation=_ACTIVATIONS[hf.hidden_act], gated_mlp=True, position="rope",
        max_position_embeddings=hf.max_position_embeddings, rope_theta=theta, rope_scaling=scaling,
        qkv_bias=qwen2 or bias, out_bias=bias and not qwen2, mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_word_embeddings=bool(hf.tie_word_embeddings), sliding_window=window, sliding_layers=sliding_layers,
        qk_norm=qwen3, initializer_range=hf.initializer_range,
    )


def to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    data = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.norm_eps, hidden_act=HF_ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope_to_hf(cfg.rope_theta, cfg.rope_scaling), attention_bias=cfg.qkv_bias,
        mlp_bias=cfg.mlp_bias, tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
    )
    if cfg.qk_norm:  # Qwen3: no mlp_bias field; sliding windows per layer
        del data["mlp_bias"]
        data.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                    use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                    layer_types=hf_layer_types(cfg))
    return data


def weight_specs(cfg: TransformerConfig) -> list[WeightSpec]:
    """Llama's tensor names; also Qwen3's q/k norms and Gemma's norms around attention and MLP."""
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
        if cfg.qk_norm:
            specs += [copy(hf + f"self_attn.{n}_norm.weight", p + f"attn/{n}_norm/scale") for n in "qk"]
        if cfg.post_norms:  # Gemma: post_attention_layernorm normalizes the attention output
            specs += [copy(hf + "post_attention_layernorm.weight", p + "attn_post_norm/scale"),
                      copy(hf + "pre_feedforward_layernorm.weight", p + "mlp_norm/scale"),
                      copy(hf + "post_feedforward_layernorm.weight", p + "mlp_post_norm/scale")]
        else:
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
