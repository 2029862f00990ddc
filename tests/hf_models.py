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
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "norm.weight", "layernorm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.float().numpy()
