"""Transfer: token alignment, CLP embeddings and baselines."""
