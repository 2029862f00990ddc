"""Attention implementations against ``layers.dot_product_attention`` (xla): Splash in Pallas interpret mode on
the CPU, the cuDNN wrapper's arguments through ``jax.nn.dot_product_attention``'s xla path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clp_jax import models
from clp_jax.errors import ClpError
from clp_jax.models import attention
from clp_jax.models.config import TransformerConfig
from clp_jax.models.layers import alibi_slopes, attention_mask, dot_product_attention

B, T, D = 2, 128, 16
SCALE = 0.3


def tiny_llama(**changes) -> TransformerConfig:
    cfg = TransformerConfig(arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, intermediate_size=48, norm="rmsnorm", norm_eps=1e-6, activation="silu",
                            gated_mlp=True, position="rope", tie_word_embeddings=False, norm_bias=False)
    return cfg.replace(**changes)


def packed_batch() -> tuple[jax.Array, jax.Array]:
    """Row 0: two documents (50 + 78 tokens); row 1: one of 100 tokens, then 28 of padding (segment 0)."""
    seg = np.ones((B, T), np.int32)
    seg[0, 50:], seg[1, 100:] = 2, 0
    pos = np.stack([np.r_[np.arange(50), np.arange(T - 50)], np.arange(T)]).astype(np.int32)
    return jnp.asarray(seg), jnp.asarray(pos)


def qkv(heads: int, kv_heads: int, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    shapes = [(B, T, heads, D), (B, T, kv_heads, D), (B, T, kv_heads, D)]
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def value_and_grads(fn, q, k, v, real):
    """Attention output and d(sum of outputs on real rows, randomly weighted)/d(q, k, v)."""
    w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32) * real[:, :, None, None]
    out, grads = jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))(q, k, v)
    return fn(q, k, v), grads


def assert_same_on_real_rows(ours, ref, real, atol=2e-5):
    (out, grads), (ref_out, ref_grads) = ours, ref
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=atol)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=atol)


@pytest.mark.parametrize("heads, kv_heads, window, cap", [(4, 4, None, None), (4, 2, 16, None), (4, 1, None, 5.0)],
                         ids=["mha-causal", "gqa-window", "mqa-softcap"])
def test_splash_matches_xla_with_packing_and_padding(heads, kv_heads, window, cap):
    seg, pos = packed_batch()
    real = np.asarray(seg != 0)
    q, k, v = qkv(heads, kv_heads)
    mask = attention_mask(seg, pos, window)
    ref = value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, mask, None, SCALE, cap), q, k, v, real)
    ours = value_and_grads(lambda q, k, v: attention.splash_attention(q, k, v, seg, SCALE, cap, window,
                                                                      interpret=True), q, k, v, real)
    assert_same_on_real_rows(ours, ref, real)


@pytest.mark.parametrize("kv_heads, window, alibi", [(4, None, False), (2, 24, False), (4, None, True)],
                         ids=["mha", "gqa-window", "alibi"])
def test_cudnn_wrapper_arguments_match_xla(kv_heads, window, alibi):
    """The cuDNN wrapper's mask, window, scale and relative ALiBi bias, run by jax.nn's xla path."""
    seg, pos = packed_batch()
    real = np.asarray(seg != 0)
    q, k, v = qkv(4, kv_heads, seed=1)
    mask = attention_mask(seg, pos, window)
    bias = None
    if alibi:
        bias = jnp.asarray(alibi_slopes(4))[None, :, None, None] * pos[:, None, None, :].astype(jnp.float32)
    ref = value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, mask, bias, SCALE), q, k, v, real)
    ours = value_and_grads(lambda q, k, v: attention.cudnn_attention(q, k, v, mask, bias, SCALE, window,
                                                                     implementation="xla"), q, k, v, real)
    assert_same_on_real_rows(ours, ref, real)


@pytest.mark.parametrize("window", [None, 5])
def test_splash_mask_is_the_models_mask_for_one_document(window):
    t = 32
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    ours = np.asarray(attention.splash_mask(t, 2, window).masks[1][:, :])
    assert np.array_equal(ours, np.asarray(attention_mask(jnp.ones((1, t), jnp.int32), pos, window))[0, 0])


def test_whole_tiny_llama_with_splash_equals_xla(monkeypatch):
    cfg = tiny_llama(sliding_window=20, sliding_layers=(True, False))
    params = models.init_params(cfg, jax.random.key(0))
    seg, pos = packed_batch()
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    ref = np.asarray(models.apply(params, cfg.replace(attention="xla"), tokens, pos, seg))
    monkeypatch.setattr(attention, "current_platform", lambda: "tpu")
    monkeypatch.setattr(attention, "splash_attention", functools.partial(attention.splash_attention, interpret=True))
    ours = np.asarray(models.apply(params, cfg.replace(attention="splash"), tokens, pos, seg))
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)


def test_auto_picks_the_platforms_kernel_and_falls_back_to_xla():
    llama, bloom = tiny_llama(dtype="bfloat16"), tiny_llama(position="alibi", dtype="bfloat16")
    assert [attention.choose(llama, p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "xla"]
    assert attention.choose(bloom, "tpu") == "xla"  # Splash has no ALiBi bias
    assert attention.choose(bloom, "gpu") == "cudnn"  # cuDNN takes it as a bias
    assert attention.choose(llama.replace(dtype="float32"), "gpu") == "xla"
    assert attention.choose(llama.replace(attn_softcap=50.0), "gpu") == "xla"
    assert attention.choose(llama.replace(attention="splash"), "tpu", cached=True) == "xla"  # KV-cache decoding


@pytest.mark.parametrize("changes, platform, words", [
    (dict(attention="splash", position="alibi"), "tpu", ["model.attention=splash", "ALiBi", "model.attention=xla"]),
    (dict(attention="cudnn"), "gpu", ["model.attention=cudnn", "float32", "model.dtype=bfloat16"]),
    (dict(attention="cudnn", dtype="bfloat16", attn_softcap=50.0), "gpu", ["soft cap", "model.attention=xla"]),
    (dict(attention="cudnn", dtype="bfloat16", head_dim=12), "gpu", ["head_dim", "12"]),
    (dict(attention="splash"), "cpu", ["model.attention=splash", "TPU", "cpu"]),
])
def test_a_kernel_that_cannot_serve_the_config_fails_in_one_line(changes, platform, words):
    with pytest.raises(ClpError) as e:
        attention.choose(tiny_llama(**changes), platform)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_model_with_splash_on_cpu_fails_at_trace_time():
    cfg = tiny_llama(attention="splash")
    params = models.init_params(cfg, jax.random.key(0))
    with pytest.raises(ClpError, match="model.attention=splash runs on TPUs"):
        models.apply(params, cfg, jnp.zeros((1, 128), jnp.int32))


def test_auto_takes_xla_where_splash_cannot_tile_the_sequence():
    cfg = tiny_llama(attention="auto")
    assert attention.choose(cfg, "tpu", seq_len=128) == "splash"
    assert attention.choose(cfg, "tpu", seq_len=16) == "xla"  # `clp-jax plan` of a short-sequence config
    with pytest.raises(ClpError, match="data.seq_len a multiple of 128"):
        attention.choose(cfg.replace(attention="splash"), "tpu", seq_len=16)


def test_splash_seq_len_must_tile():
    q, k, v = (x[:, :100] for x in qkv(4, 4))
    with pytest.raises(ClpError, match="multiple of 128"):
        attention.splash_attention(q, k, v, jnp.ones((B, 100), jnp.int32), SCALE, None, None)


def test_splash_train_flops_count_the_tiles_the_kernel_visits():
    """Causal T=1024 in 512-tiles: 3 of 4 tiles per layer; a 100-token window: the 2 diagonal tiles + 1."""
    cfg = tiny_llama(num_layers=2, sliding_window=100, sliding_layers=(False, True))
    per_tile = 2 * 512 * 512 * cfg.head_dim * cfg.num_heads * 3  # one matmul over a tile, 3 rows
    got = attention.splash_train_flops(cfg, rows=3, length=1024, recomputed=True)
    assert got == (3 + 3) * per_tile * (2 + 3 + 4 + 2)
    assert attention.splash_train_flops(cfg, 3, 1024, recomputed=False) == (3 + 3) * per_tile * 9
