"""One architecture-neutral description of a decoder-only transformer (GPT-2, Llama family, BLOOM, Gemma)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp
import ml_dtypes
import numpy as np

Arch = Literal["gpt2", "llama", "bloom", "gemma3"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# The fields of TransformerConfig that say how a run computes, not what the model is: a checkpoint's config.json
# records every other field (its "dtype" is the stored weights' dtype, set from param_dtype on export).
NUMERICS_FIELDS = ("dtype", "param_dtype", "remat", "logits_chunk", "attention")
# Attention implementations (``models.attention``): auto picks splash on TPU, cudnn on NVIDIA GPUs, else xla.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
# Remat policies, MaxText's names: which named intermediates of a layer the backward pass keeps (``full`` keeps
# none and recomputes the layer, ``none`` keeps everything); ``transformer.remat_policy`` builds them.
REMAT_POLICIES = ("none", "full", "minimal", "minimal_with_context", "save_dot_with_context_except_mlp",
                  "save_dot_except_mlpwi", "save_dot_except_mlp", "save_qkv_proj")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything the Flax decoder needs: the architecture, built from (and written back to) a Hugging Face config,
    and the run's numerics (``NUMERICS_FIELDS``)."""

    arch: Arch
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: Literal["layernorm", "rmsnorm", "rmsnorm_plus_one"]  # rmsnorm_plus_one: Gemma's x * (1 + w), in float32
    norm_eps: float
    activation: Literal["gelu_tanh", "gelu", "silu", "relu"]
    gated_mlp: bool
    position: Literal["learned", "rope", "alibi"]
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of HF rope parameters
    local_rope_theta: float | None = None  # RoPE base of sliding-window layers, unscaled (None: as global layers)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True
    embed_norm: bool = False
    tie_word_embeddings: bool = True
    residual_from_norm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 option
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None  # which layers use sliding_window (None: all of them)
    qk_norm: bool = False  # a ``norm`` over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False  # norms on the attention and MLP outputs before the residual add (Gemma)
    embed_scale: bool = False  # input embeddings times sqrt(hidden_size) (Gemma)
    attn_scale_dim: float | None = None  # scores scaled by attn_scale_dim**-0.5 (None: head_dim)
    attn_softcap: float | None = None  # attention scores -> c * tanh(scores / c) before masking
    final_softcap: float | None = None  # output logits -> c * tanh(logits / c)
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # stored dtype
    remat: str = "none"  # one of REMAT_POLICIES; True/False mean "full"/"none"
    logits_chunk: int | None = None  # training loss: positions whose logits exist at once (None: all)
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {sorted(DTYPES)}")
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        for name, allowed in (("remat", REMAT_POLICIES), ("attention", ATTENTION_IMPLEMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    def architecture(self) -> dict[str, Any]:
        """Every field but the numerics: what config.json says about the model."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NUMERICS_FIELDS}

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i`` (None: full causal attention)."""
        if self.sliding_layers is None or self.sliding_layers[i]:
            return self.sliding_window
        return None

    def layer_rope(self, i: int) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
        """(RoPE base, scaling) of layer ``i``: sliding layers take ``local_rope_theta`` when it is set."""
        if self.local_rope_theta is not None and self.layer_window(i) is not None:
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

    def num_params(self) -> int:
        """Parameter count (embeddings included, tied output counted once)."""
        e, h, kv, d, m, v = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                             self.intermediate_size, self.vocab_size)
        attn = e * d * (h + 2 * kv) + h * d * e
        if self.qkv_bias:
            attn += d * (h + 2 * kv)
        if self.out_bias:
            attn += e
        mlp = e * m * (3 if self.gated_mlp else 2) + ((m * (2 if self.gated_mlp else 1) + e) if self.mlp_bias else 0)
        norm = e * (2 if self.norm_bias else 1)
        if self.qk_norm:
            attn += 2 * d * (2 if self.norm_bias else 1)
        layer_norms = 4 if self.post_norms else 2
        total = self.num_layers * (attn + mlp + layer_norms * norm) + norm + v * e
        if self.position == "learned":
            total += self.max_position_embeddings * e
        if self.embed_norm:
            total += norm
        if not self.tie_word_embeddings:
            total += v * e
        return total
