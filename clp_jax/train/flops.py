"""Model FLOPs of a training step, for MFU: ``6 * N_matmul * tokens + 12 * L * H * d_head * seq_len * tokens``.

``N_matmul`` counts the weights every token multiplies: all parameters except the input embedding tables (a
lookup, not a matmul) plus the output projection ``vocab * hidden`` (tied or not). 6 = 2 (multiply-add) x 3
(forward, and backward for activations and weights). The attention term counts QK^T and AV over the full
``seq_len`` window (4 * H * d_head * seq_len per token forward, x3), as in PaLM's MFU, or over the sliding window
in layers that have one (when it is shorter); causal masking, remat recomputation and norms/softmax are not
counted.
"""

from __future__ import annotations

from clp_jax.models.config import TransformerConfig


def matmul_params(cfg: TransformerConfig) -> int:
    """Weights multiplied per token: non-embedding parameters plus the output projection."""
    e, v = cfg.hidden_size, cfg.vocab_size
    embedding_tables = v * e * (1 if cfg.tie_word_embeddings else 2)
    if cfg.position == "learned":
        embedding_tables += cfg.max_position_embeddings * e
    return cfg.num_params() - embedding_tables + v * e


def train_step_flops(cfg: TransformerConfig, tokens: int, seq_len: int) -> float:
    """FLOPs of forward + backward over ``tokens`` tokens in rows of ``seq_len``."""
    spans = sum(min(seq_len, cfg.layer_window(i) or seq_len) for i in range(cfg.num_layers))
    attention = 12 * cfg.num_heads * cfg.head_dim * spans
    return float(tokens) * (6 * matmul_params(cfg) + attention)
