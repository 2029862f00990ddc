"""Evaluation: held-out loss during training, perplexity of documents, task metrics and SFT responses."""
