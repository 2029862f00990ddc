"""GPT-2 (the CLP-Transfer paper's GPT2-XL source): HF config and weight names <-> our tree."""

from __future__ import annotations

from typing import Any

import numpy as np

from clp_jax.models.config import TransformerConfig
from clp_jax.models.weights import WeightSpec, conv1d, copy, split, torch_linear

MODEL_TYPES = ("gpt2",)
BASE_PREFIX = "transformer."
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def from_hf(hf: Any) -> TransformerConfig:
    if hf.activation_function not in _ACTIVATIONS:
        raise ValueError(f"activation_function {hf.activation_function!r} is not supported")
    e = hf.n_embd
    return TransformerConfig(
        arch="gpt2", vocab_size=hf.vocab_size, hidden_size=e, num_layers=hf.n_layer, num_heads=hf.n_head,
        num_kv_heads=hf.n_head, head_dim=e // hf.n_head, intermediate_size=hf.n_inner or 4 * e,
        norm="layernorm", norm_eps=hf.layer_norm_epsilon, activation=_ACTIVATIONS[hf.activation_function],
        gated_mlp=False, position="learned", max_position_embeddings=hf.n_positions, qkv_bias=True,
        out_bias=True, mlp_bias=True, tie_word_embeddings=getattr(hf, "tie_word_embeddings", True),
        scale_attn_by_inverse_layer_idx=bool(hf.scale_attn_by_inverse_layer_idx),
        initializer_range=hf.initializer_range,
    )


def to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
    return dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
        n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps, activation_function=act,
        scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
    )


def weight_specs(cfg: TransformerConfig) -> list[WeightSpec]:
    e, h, d, m = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    specs = [copy("wte.weight", "embed/embedding"), copy("wpe.weight", "pos_embed/embedding")]
    for i in range(cfg.num_layers):
        hf, p = f"h.{i}.", f"layers_{i}/"
        specs += [
            copy(hf + "ln_1.weight", p + "attn_norm/scale"),
            copy(hf + "ln_1.bias", p + "attn_norm/bias"),
            split(hf + "attn.c_attn.weight", tuple(p + f"attn/{n}/kernel" for n in "qkv"),
                  lambda a: tuple(x.reshape(e, h, d) for x in np.split(a, 3, axis=1)),
                  lambda *ks: np.concatenate([k.reshape(e, e) for k in ks], axis=1)),
            split(hf + "attn.c_attn.bias", tuple(p + f"attn/{n}/bias" for n in "qkv"),
                  lambda a: tuple(x.reshape(h, d) for x in np.split(a, 3)),
                  lambda *bs: np.concatenate([b.reshape(-1) for b in bs])),
            conv1d(hf + "attn.c_proj.weight", p + "attn/o/kernel", (h, d), (e,)),
            copy(hf + "attn.c_proj.bias", p + "attn/o/bias"),
            copy(hf + "ln_2.weight", p + "mlp_norm/scale"),
            copy(hf + "ln_2.bias", p + "mlp_norm/bias"),
            conv1d(hf + "mlp.c_fc.weight", p + "mlp/up/kernel", (e,), (m,)),
            copy(hf + "mlp.c_fc.bias", p + "mlp/up/bias"),
            conv1d(hf + "mlp.c_proj.weight", p + "mlp/down/kernel", (m,), (e,)),
            copy(hf + "mlp.c_proj.bias", p + "mlp/down/bias"),
        ]
    specs += [copy("ln_f.weight", "final_norm/scale"), copy("ln_f.bias", "final_norm/bias")]
    if not cfg.tie_word_embeddings:
        specs.append(torch_linear("lm_head.weight", "lm_head/kernel", (e,), (cfg.vocab_size,), top_level=True))
    return specs
