"""Independent numpy oracles that tests compare the package's jnp code against."""

import numpy as np


def next_token_targets(tokens: np.ndarray, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Targets ``tokens[:, t + 1]`` at position t, weighted 1 only when t and t + 1 are in the same segment.

    So no document predicts another's first token, padding predicts nothing, and the last column (whose next
    token is in no row) has weight 0.
    """
    tokens, segment_ids = np.asarray(tokens), np.asarray(segment_ids)
    targets = np.zeros_like(tokens, dtype=np.int32)
    targets[:, :-1] = tokens[:, 1:]
    weights = np.zeros(tokens.shape, dtype=np.float32)
    weights[:, :-1] = (segment_ids[:, :-1] != 0) & (segment_ids[:, 1:] == segment_ids[:, :-1])
    return targets, weights
