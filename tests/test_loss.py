"""The chunked output-layer cross-entropy against a float64 numpy oracle: value, d(hidden), d(weight)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clp_jax.sharding import make_mesh
from clp_jax.train.loss import token_targets, weighted_nll_sum

B, T, E, V = 3, 7, 8, 11


def oracle(h, w, targets, weights, vocab_major, cap=None):
    """(sum of weighted nll, d/dh, d/dw) in float64 from the closed form d/dlogits = weight * (softmax - onehot),
    through logits -> cap * tanh(logits / cap) when ``cap`` is given."""
    h, w, weights = (np.asarray(x, np.float64) for x in (h, w, weights))
    wv = w if vocab_major else w.T  # [V, E]
    logits = h @ wv.T
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    total = float(((lse - picked) * weights).sum())
    g = (np.exp(logits - lse[..., None]) - np.eye(V)[targets]) * weights[..., None]
    if cap is not None:
        g = g * (1 - np.tanh(h @ wv.T / cap) ** 2)
    dh = g @ wv
    dwv = np.einsum("btv,bte->ve", g, h)
    return total, dh, dwv if vocab_major else dwv.T


def inputs(seed, vocab_major):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((B, T, E)).astype(np.float32)
    w = rng.standard_normal((V, E) if vocab_major else (E, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    weights = (rng.random((B, T)) * (rng.random((B, T)) > 0.3)).astype(np.float32)  # zeros and fractions
    return h, w, targets, weights


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 3, T, 100])
def test_value_and_gradients_match_float64(chunk, vocab_major):
    h, w, targets, weights = inputs(0, vocab_major)
    fn = jax.jit(jax.value_and_grad(lambda h, w: weighted_nll_sum(h, w, targets, weights, chunk, vocab_major),
                                    argnums=(0, 1)))
    total, (dh, dw) = fn(h, w)
    want, want_dh, want_dw = oracle(h, w, targets, weights, vocab_major)
    assert float(total) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(dh, want_dh, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dw, want_dw, atol=1e-5, rtol=1e-5)
    # Without a gradient, only the nll is computed: same value.
    assert float(jax.jit(lambda h, w: weighted_nll_sum(h, w, targets, weights, chunk, vocab_major))(h, w)) == \
        pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
def test_soft_capped_logits_value_and_gradients_match_float64(chunk):
    h, w, targets, weights = inputs(2, False)
    fn = jax.jit(jax.value_and_grad(lambda h, w: weighted_nll_sum(h, w, targets, weights, chunk, False, 1.5),
                                    argnums=(0, 1)))
    total, (dh, dw) = fn(h, w)
    want, want_dh, want_dw = oracle(h, w, targets, weights, False, cap=1.5)
    assert float(total) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(dh, want_dh, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dw, want_dw, atol=1e-5, rtol=1e-5)
    assert abs(want - oracle(h, w, targets, weights, False)[0]) > 1.0  # the cap matters here


def test_cotangent_scales_the_stored_gradients():
    h, w, targets, weights = inputs(1, True)
    grad = jax.grad(lambda h, w: 2.5 * weighted_nll_sum(h, w, targets, weights, 2) / 7.0, argnums=(0, 1))(h, w)
    _, dh, dw = oracle(h, w, targets, weights, True)
    np.testing.assert_allclose(grad[0], dh * 2.5 / 7.0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad[1], dw * 2.5 / 7.0, atol=1e-5, rtol=1e-5)


def test_bfloat16_hidden_and_weight_give_float32_loss_and_input_dtype_grads():
    h, w, targets, weights = inputs(2, True)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    total, (dh, dw) = jax.value_and_grad(lambda h, w: weighted_nll_sum(h, w, targets, weights, 4),
                                         argnums=(0, 1))(hb, wb)
    want, want_dh, want_dw = oracle(np.asarray(hb, np.float32), np.asarray(wb, np.float32), targets, weights, True)
    assert total.dtype == jnp.float32 and dh.dtype == dw.dtype == jnp.bfloat16
    assert float(total) == pytest.approx(want, rel=1e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float32), want_dw, atol=0.05, rtol=0.05)


def test_sharded_over_eight_devices_matches_one():
    """Under a (data, fsdp, tensor) = (2, 2, 2) mesh, with the constraints of the rules table, same numbers."""
    rng = np.random.default_rng(3)
    h = rng.standard_normal((8, T, E)).astype(np.float32)
    w = rng.standard_normal((12, E)).astype(np.float32)
    targets = rng.integers(0, 12, (8, T)).astype(np.int32)
    weights = (rng.random((8, T)) > 0.2).astype(np.float32)
    mesh = make_mesh(2, 2, 2)

    def loss(h, w):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return weighted_nll_sum(h, w, targets, weights, 3)

    shard = jax.sharding.NamedSharding
    spec = jax.sharding.PartitionSpec
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
                 in_shardings=(shard(mesh, spec(("data", "fsdp"))), shard(mesh, spec(("tensor", "fsdp")))))
    total, (dh, dw) = fn(h, w)
    want = jax.jit(jax.value_and_grad(lambda h, w: weighted_nll_sum(h, w, targets, weights), argnums=(0, 1)))(h, w)
    assert float(total) == pytest.approx(float(want[0]), rel=1e-6)
    np.testing.assert_allclose(dh, want[1][0], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(dw, want[1][1], atol=1e-6, rtol=1e-5)


def test_token_targets_weights():
    tokens = np.array([[5, 6, 7, 8, 9]], np.int32)
    segments = np.array([[1, 1, 2, 2, 0]], np.int32)
    targets, weights = token_targets(tokens, segments)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(weights, [[1, 0, 1, 0, 0]])
