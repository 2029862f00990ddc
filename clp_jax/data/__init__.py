"""Data: sources, tokenization, packing and multilingual mixtures."""
