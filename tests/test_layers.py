"""Attention's, LayerNorm's and GELU's hand-written VJPs against float64 PyTorch autograd; RMSNorms against HF's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from clp_jax.models.config import TransformerConfig
from clp_jax.models.layers import Norm, activation, alibi_slopes, attention_mask, dot_product_attention


def torch_attention(q, k, v, bias, scale, softcap=None):
    """softmax(cap(q k^T * scale) + bias) v in float64, heads of q grouped onto kv heads as Hugging Face does."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    k = k.repeat_interleave(h // kv, dim=2)
    v = v.repeat_interleave(h // kv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores + bias
    return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), v)


CASES = {
    "causal": dict(heads=4, kv=4, segments=[[1] * 12, [1] * 12], alibi=False, window=None),
    "gqa_packed_padded": dict(heads=6, kv=2, segments=[[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], alibi=False,
                              window=None),
    "alibi_window": dict(heads=4, kv=1, segments=[[1] * 7 + [0] * 5, [3] * 12], alibi=True, window=4),
    "softcap_window": dict(heads=4, kv=2, segments=[[1] * 9 + [0] * 3, [1] * 6 + [2] * 6], alibi=False, window=4,
                           softcap=1.5),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_value_and_grads_match_float64_autograd(case):
    c = CASES[case]
    rng = np.random.default_rng(0)
    segments = np.asarray(c["segments"], np.int32)
    b, t = segments.shape
    positions = np.zeros_like(segments)
    for row in range(b):  # positions restart at each document, as packing writes them
        for i in range(1, t):
            positions[row, i] = 0 if segments[row, i] != segments[row, i - 1] else positions[row, i - 1] + 1
    q = rng.normal(size=(b, t, c["heads"], 8)).astype(np.float32)
    k = rng.normal(size=(b, t, c["kv"], 8)).astype(np.float32)
    v = rng.normal(size=(b, t, c["kv"], 8)).astype(np.float32)
    cotangent = rng.normal(size=q.shape).astype(np.float32)
    cotangent[segments == 0] = 0.0  # padding queries get no gradient in training (their loss weight is 0)
    mask = attention_mask(jnp.asarray(segments), jnp.asarray(positions), c["window"])
    bias = np.zeros((b, 1, 1, t), np.float32)
    if c["alibi"]:
        bias = alibi_slopes(c["heads"])[None, :, None, None] * positions[:, None, None, :].astype(np.float32)
    scale = 8**-0.5

    softcap = c.get("softcap")
    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask, jnp.asarray(bias) if c["alibi"] else None,
                                                             scale, softcap), q, k, v)
    grads = vjp(jnp.asarray(cotangent))

    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    additive = np.where(np.asarray(mask), bias, -1e30)
    ref = torch_attention(tq, tk, tv, torch.tensor(additive, dtype=torch.float64), scale, softcap)
    ref.backward(torch.tensor(cotangent, dtype=torch.float64))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad)):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-5)


def test_fully_masked_rows_stay_finite_and_get_no_gradient():
    """A query that may attend to nothing (padding) yields finite output and no gradient through its scores."""
    mask = jnp.asarray([[True, False, False], [False, False, False], [True, True, True]])[None, None]
    q = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 2, 4)), jnp.float32)
    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask, None, 0.5), q, q[:, :, :1], q[:, :, :1])
    assert np.isfinite(np.asarray(out)).all()
    only_masked_row = jnp.zeros_like(out).at[:, 1].set(1.0)
    dq, dk, dv = vjp(only_masked_row)
    np.testing.assert_array_equal(np.asarray(dq), 0.0)
    np.testing.assert_array_equal(np.asarray(dk), 0.0)
    assert np.isfinite(np.asarray(dv)).all()


@pytest.mark.parametrize("kind", ["rmsnorm", "rmsnorm_plus_one"])
def test_rmsnorms_match_transformers_in_bfloat16(kind):
    """Llama/Qwen3 RMSNorm casts before the weight, Gemma's applies (1 + w) in float32: bit-equal to HF in bf16."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(3, 5, 64)) * 3, dtype=torch.bfloat16)
    ref = (Gemma3RMSNorm if kind == "rmsnorm_plus_one" else Qwen3RMSNorm)(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(rng.normal(size=64) * 0.5))
        want = ref(x).float().numpy()
    cfg = TransformerConfig(arch="llama", vocab_size=8, hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1,
                            head_dim=64, intermediate_size=8, norm=kind, norm_eps=1e-6, norm_bias=False,
                            activation="silu", gated_mlp=True, position="rope", dtype="bfloat16",
                            param_dtype="bfloat16")
    weight = jnp.asarray(ref.weight.detach().float().numpy(), jnp.bfloat16)
    got = Norm(cfg).apply({"params": {"scale": weight}}, jnp.asarray(x.float().numpy(), jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


@pytest.mark.parametrize("norm_bias", [True, False])
def test_layernorm_value_and_grads_match_float64_autograd(norm_bias):
    """LayerNorm's hand-written VJP: x, scale and bias gradients against torch's layer_norm in float64."""
    cfg = TransformerConfig(arch="gpt2", vocab_size=8, hidden_size=48, num_layers=1, num_heads=1, num_kv_heads=1,
                            head_dim=48, intermediate_size=8, norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
                            gated_mlp=False, position="learned", norm_bias=norm_bias)
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal((3, 5, 48)) * 2 + 1 for _ in range(2))
    params = {"scale": rng.standard_normal(48) * 0.5 + 1, **({"bias": rng.standard_normal(48)} if norm_bias else {})}
    out, vjp = jax.vjp(lambda x, p: Norm(cfg).apply({"params": p}, x), jnp.asarray(x, jnp.float32),
                       jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
    dx, dp = vjp(jnp.asarray(dy, jnp.float32))
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(params["scale"], requires_grad=True)
    tb = torch.tensor(params["bias"], requires_grad=True) if norm_bias else None
    ref = torch.nn.functional.layer_norm(tx, (48,), tw, tb, eps=1e-5)
    ref.backward(torch.tensor(dy))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), atol=5e-5)
    np.testing.assert_allclose(np.asarray(dp["scale"]), tw.grad.numpy(), rtol=1e-5, atol=5e-5)
    if norm_bias:
        np.testing.assert_allclose(np.asarray(dp["bias"]), tb.grad.numpy(), rtol=1e-5, atol=5e-5)


def test_gelu_tanh_grad_matches_float64_autograd():
    """The tanh GELU's hand-written VJP against torch's gelu(approximate="tanh") in float64, tails included."""
    x = np.linspace(-8, 8, 1001)
    dy = np.random.default_rng(0).standard_normal(x.shape)
    out, vjp = jax.vjp(lambda v: activation("gelu_tanh", v), jnp.asarray(x, jnp.float32))
    (dx,) = vjp(jnp.asarray(dy, jnp.float32))
    tx = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.gelu(tx, approximate="tanh")
    ref.backward(torch.tensor(dy))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=1e-5)  # float32 1 + tanh in the tails
    np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), rtol=1e-5, atol=1e-5)
