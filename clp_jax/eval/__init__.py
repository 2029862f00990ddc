"""Evaluation: perplexity now; generation metrics as post-training lands."""
