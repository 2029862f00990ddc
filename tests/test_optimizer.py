"""AdamW schedule, decay mask, embeddings-only stage and clipping against hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from pydantic import ValidationError

from clp_jax import models
from clp_jax.models.config import TransformerConfig
from clp_jax.train.optimizer import (
    OptimizerConfig,
    current_learning_rate,
    decay_mask,
    embedding_mask,
    learning_rate_schedule,
    make_optimizer,
)

PEAK, END = 2e-3, 2e-4


def tiny_cfg(**changes):
    cfg = TransformerConfig(arch="llama", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, intermediate_size=48, norm="rmsnorm", norm_eps=1e-5, activation="silu",
                            gated_mlp=True, position="rope", qkv_bias=True, mlp_bias=True, norm_bias=False,
                            tie_word_embeddings=False)
    return cfg.replace(**changes)


@pytest.mark.parametrize("schedule, expected", [
    ("cosine", {35: END + (PEAK - END) * (1 + math.cos(math.pi * 0.25)) / 2, 60: (PEAK + END) / 2}),
    ("linear", {35: PEAK + (END - PEAK) * 0.25, 60: (PEAK + END) / 2}),
    ("constant", {35: PEAK, 60: PEAK, 110: PEAK, 500: PEAK}),
])
def test_schedule_values(schedule, expected):
    cfg = OptimizerConfig(learning_rate=PEAK, warmup_steps=10, total_steps=110, schedule=schedule,
                          end_learning_rate_fraction=0.1)
    lr = learning_rate_schedule(cfg)
    want = {0: 0.0, 1: PEAK / 10, 5: PEAK / 2, 10: PEAK, 110: END, 500: END} | expected
    for step, value in want.items():
        assert float(lr(step)) == pytest.approx(value, rel=1e-6, abs=1e-12), (schedule, step)


def test_schedule_without_warmup_starts_at_peak():
    lr = learning_rate_schedule(OptimizerConfig(learning_rate=PEAK, total_steps=100, schedule="linear"))
    assert float(lr(0)) == pytest.approx(PEAK)
    assert float(lr(50)) == pytest.approx(PEAK + (END - PEAK) / 2)


def test_config_rejects_decay_ending_before_warmup():
    with pytest.raises(ValidationError, match="larger than warmup_steps"):
        OptimizerConfig(warmup_steps=100, total_steps=100)
    with pytest.raises(ValidationError):
        OptimizerConfig(total_steps=10, embeddings_only_steps=-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decay_mask(arch):
    cfg = tiny_cfg() if arch == "llama" else tiny_cfg(
        arch="gpt2", norm="layernorm", norm_bias=True, position="learned", num_kv_heads=4, gated_mlp=False,
        out_bias=True, tie_word_embeddings=True, max_position_embeddings=16)
    mask = decay_mask(models.param_shapes(cfg))
    layer = mask["layers_0"]
    assert layer["attn"]["q"]["kernel"] and layer["attn"]["o"]["kernel"] and layer["mlp"]["up"]["kernel"]
    assert mask["embed"]["embedding"]
    assert not layer["attn"]["q"]["bias"]  # a 2-D [heads, head_dim] bias is still a bias
    assert not layer["mlp"]["down"]["bias"] and not layer["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    if arch == "gpt2":
        assert mask["pos_embed"]["embedding"] and not layer["attn"]["o"]["bias"] and not mask["final_norm"]["bias"]
    else:
        assert mask["lm_head"]["kernel"]


def _random_like(tree, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), tree)


def _params():
    return _random_like(models.param_shapes(tiny_cfg()), 0, 0.02)


def test_embeddings_only_stage():
    k = 3
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20, weight_decay=0.1, max_grad_norm=None,
                          embeddings_only_steps=k)
    params = _params()
    is_embed = embedding_mask(params)
    tx = make_optimizer(cfg, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    p = params
    for i in range(k):
        updates, state = update(_random_like(params, i), state, p)
        p = optax.apply_updates(p, updates)
        assert float(current_learning_rate(state)) == pytest.approx(float(learning_rate_schedule(cfg)(i)))
    for e, before, after in zip(jax.tree.leaves(is_embed), jax.tree.leaves(params), jax.tree.leaves(p)):
        same = np.array_equal(np.asarray(before), np.asarray(after))
        assert same != e  # frozen exactly unless an embedding (embed and lm_head both move)
    # The rest's Adam starts fresh at step K (its first step is ~ -lr(K) * sign(g)), with the global schedule.
    g = _random_like(params, 99)
    updates, state = update(g, state, p)
    bias_step = np.asarray(updates["layers_0"]["mlp"]["down"]["bias"])
    np.testing.assert_allclose(bias_step, -float(learning_rate_schedule(cfg)(k)) * np.sign(g["layers_0"]["mlp"]["down"]
                               ["bias"]), rtol=1e-5)
    moved = optax.apply_updates(p, updates)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(moved)))


def test_embeddings_stage_clips_only_what_trains():
    """During the stage the clip sees only embedding gradients: huge frozen gradients do not shrink them."""
    cfg = OptimizerConfig(learning_rate=1e-2, total_steps=20, b1=0.9, max_grad_norm=1.0, embeddings_only_steps=2)
    params = _random_like({"embed": {"embedding": jnp.zeros((8, 4))}, "lm_head": {"kernel": jnp.zeros((4, 8))},
                           "mlp": {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros(6)}}, 0)
    g = jax.tree.map(lambda e, x: x if e else 1e3 * x, embedding_mask(params), _random_like(params, 1, 1e-2))
    tx = make_optimizer(cfg, params)
    _, state = jax.jit(tx.update)(g, tx.init(params), params)
    mus = [m for _, m in optax.tree_utils.tree_get_all_with_path(state, "mu")
           if not isinstance(m["embed"]["embedding"], optax.MaskedNode)]
    np.testing.assert_allclose(mus[0]["embed"]["embedding"], 0.1 * g["embed"]["embedding"], rtol=1e-6)


def test_embeddings_stage_needs_embeddings():
    from clp_jax.errors import ClpError

    with pytest.raises(ClpError, match="no embed"):
        make_optimizer(OptimizerConfig(total_steps=10, embeddings_only_steps=2), {"w": jnp.zeros((2, 2))})


@pytest.mark.parametrize("scale, clipped", [(100.0, True), (0.01, False)])
def test_global_norm_clipping(scale, clipped):
    """A quadratic 0.5 * scale * |w - t|^2: the gradient Adam sees (mu / (1 - b1)) has norm <= max_grad_norm."""
    cfg = OptimizerConfig(learning_rate=1e-3, total_steps=10, schedule="constant", max_grad_norm=0.5, weight_decay=0)
    params = {"a": jnp.ones((3, 2)), "b": jnp.zeros(4)}
    target = {"a": jnp.arange(6.0).reshape(3, 2), "b": jnp.full(4, -2.0)}
    loss = lambda p: 0.5 * scale * sum(jnp.sum((p[n] - target[n]) ** 2) for n in p)  # noqa: E731
    g = jax.grad(loss)(params)
    tx = make_optimizer(cfg, params)
    _, state = tx.update(g, tx.init(params), params)
    seen = jax.tree.map(lambda m: m / (1 - cfg.b1), optax.tree_utils.tree_get(state, "mu"))
    norm = float(optax.global_norm(g))
    assert (norm > 0.5) == clipped
    assert float(optax.global_norm(seen)) == pytest.approx(min(norm, 0.5), rel=1e-5)
    np.testing.assert_allclose(seen["a"], g["a"] * min(1.0, 0.5 / norm), rtol=1e-5)
