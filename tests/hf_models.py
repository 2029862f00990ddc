"""Tiny random transformers (PyTorch) models, the numerical oracle for the Flax models."""

import torch
import transformers

TINY = {
    "gpt2": dict(cls="GPT2Config", vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=0, eos_token_id=0),
    "gpt2-scaled": dict(cls="GPT2Config", vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0,
                        scale_attn_by_inverse_layer_idx=True, activation_function="gelu"),
    "llama-tied": dict(cls="LlamaConfig", vocab_size=300, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       tie_word_embeddings=True, max_position_embeddings=128),
    "llama-gqa-untied": dict(cls="LlamaConfig", vocab_size=300, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(cls="LlamaConfig", vocab_size=300, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                        tie_word_embeddings=False, rope_parameters=dict(
                            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen2": dict(cls="Qwen2Config", vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral-window": dict(cls="MistralConfig", vocab_size=300, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                           tie_word_embeddings=False),
    "qwen3-gqa-untied": dict(cls="Qwen3Config", vocab_size=300, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                             tie_word_embeddings=False, max_position_embeddings=128),
    "qwen3-tied-window": dict(cls="Qwen3Config", vocab_size=300, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              tie_word_embeddings=True, attention_bias=True, use_sliding_window=True,
                              sliding_window=4, max_window_layers=1, max_position_embeddings=128),
    # Sliding and global layers with their own RoPE (global: linear x8), query_pre_attn_scalar != head_dim.
    "gemma3": dict(cls="Gemma3TextConfig", vocab_size=300, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   sliding_window=4, query_pre_attn_scalar=24, max_position_embeddings=128,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                   rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=100000.0),
                                    "sliding_attention": dict(rope_type="default", rope_theta=100.0)}),
    # Logit soft-capping (transformers' Gemma 3 ignores attn_logit_softcapping), untied, the older
    # rope_theta / rope_local_base_freq / rope_scaling keys.
    "gemma3-softcap": dict(cls="Gemma3TextConfig", vocab_size=300, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                           sliding_window=3, sliding_window_pattern=2, attn_logit_softcapping=1.0,
                           final_logit_softcapping=0.5, tie_word_embeddings=False, query_pre_attn_scalar=8,
                           rope_theta=50000.0, rope_local_base_freq=500.0, max_position_embeddings=128,
                           rope_scaling=dict(rope_type="linear", factor=2.0)),
    "gemma2": dict(cls="Gemma2Config", vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=3,
                   query_pre_attn_scalar=16, attn_logit_softcapping=1.0, final_logit_softcapping=0.5,
                   max_position_embeddings=128),
    "bloom": dict(cls="BloomConfig", vocab_size=300, hidden_size=32, n_layer=2, n_head=4),
    "bloom-6heads": dict(cls="BloomConfig", vocab_size=300, hidden_size=48, n_layer=2, n_head=6,
                         apply_residual_connection_post_layernorm=True),
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A tiny random ``AutoModelForCausalLM`` whose every parameter (biases and norms too) is random."""
    spec = dict(TINY[name], **overrides)
    cfg = getattr(transformers, spec.pop("cls"))(**spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    norm_center = 0.0 if cfg.model_type.startswith("gemma") else 1.0  # Gemma's norms scale by 1 + weight
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "norm.weight", "layernorm.weight")):
                p.copy_(norm_center + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.float().numpy()
