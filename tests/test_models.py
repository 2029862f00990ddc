"""Flax models against transformers' PyTorch models: logits on padded random batches, sharded too."""

import jax
import numpy as np
import pytest
from hf_models import TINY, make_hf_model, torch_logits

from clp_jax import models
from clp_jax.hf.reader import load_params
from clp_jax.sharding import make_mesh

apply = jax.jit(models.apply, static_argnums=1)  # one compile per call shape, not one per op


def padded_batch(rng, vocab, lengths, t):
    ids = rng.integers(0, vocab, size=(len(lengths), t))
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask


@pytest.mark.parametrize("name", list(TINY))
def test_logits_match_pytorch(name, tmp_path):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = load_params(str(tmp_path), mesh, progress=False)
    ids, mask = padded_batch(np.random.default_rng(0), 300, [12, 7, 3, 12], 12)
    ours = np.asarray(apply(params, cfg, ids, None, mask))
    ref = torch_logits(hf, ids, mask)
    valid = mask.astype(bool)
    assert np.max(np.abs(ours[valid] - ref[valid])) < 1e-4
    assert np.isfinite(ours).all()


def test_packed_segments_equal_separate_documents(tmp_path):
    """Two documents packed into one row (segment ids, per-document positions) = each run alone."""
    hf = make_hf_model("llama-gqa-untied")
    hf.save_pretrained(tmp_path)
    cfg, params = load_params(str(tmp_path), make_mesh(data=-1), progress=False)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 300, 5), rng.integers(0, 300, 7)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 5 + [2] * 7])
    pos = np.array([list(range(5)) + list(range(7))])
    out = np.asarray(apply(params, cfg, packed, pos, seg))[0]
    alone_a = np.asarray(apply(params, cfg, a[None]))[0]
    alone_b = np.asarray(apply(params, cfg, b[None]))[0]
    np.testing.assert_allclose(out[:5], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[5:], alone_b, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_packed_segments_learned_and_alibi(name, tmp_path):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path)
    cfg, params = load_params(str(tmp_path), make_mesh(data=-1), progress=False)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 300, 4), rng.integers(0, 300, 6)
    out = np.asarray(apply(params, cfg, np.concatenate([a, b])[None],
                                  np.array([list(range(4)) + list(range(6))]), np.array([[1] * 4 + [2] * 6])))[0]
    np.testing.assert_allclose(out[4:], np.asarray(apply(params, cfg, b[None]))[0], atol=1e-5)


def test_bfloat16_compute_close_to_float32(tmp_path):
    hf = make_hf_model("llama-tied")
    hf.save_pretrained(tmp_path)
    mesh = make_mesh(data=-1)
    cfg, params = load_params(str(tmp_path), mesh, progress=False)
    ids = np.random.default_rng(3).integers(0, 300, (2, 10))
    f32 = np.asarray(apply(params, cfg, ids))
    bf16 = np.asarray(apply(params, cfg.replace(dtype="bfloat16"), ids))
    assert bf16.dtype == np.float32
    assert np.max(np.abs(f32 - bf16)) < 0.1 and not np.array_equal(f32, bf16)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen3-tied-window", "gemma3-softcap", "gemma2"])
def test_param_count_and_axes_cover_every_parameter(name):
    hf = make_hf_model(name)
    cfg = models.family(hf.config.model_type).from_hf(hf.config)
    params = models.init_params(cfg, jax.random.key(0))
    n_ours = sum(x.size for x in jax.tree.leaves(params))
    assert n_ours == cfg.num_params() == sum(p.numel() for p in hf.parameters())
    axes = models.param_axes(cfg)
    for a, p in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(params)):
        assert len(a) == p.ndim


def test_existing_families_keep_their_parameter_trees():
    """Gemma's and Qwen3's extra norms exist only where the config asks for them."""
    for name, extra in (("llama-tied", set()), ("qwen3-gqa-untied", {"q_norm", "k_norm"})):
        cfg = models.family(make_hf_model(name).config.model_type).from_hf(make_hf_model(name).config)
        layer = models.param_shapes(cfg)["layers_0"]
        assert set(layer) == {"attn_norm", "attn", "mlp_norm", "mlp"}
        assert set(layer["attn"]) == {"q", "k", "v", "o"} | extra
    cfg = models.family("gemma3_text").from_hf(make_hf_model("gemma3").config)
    layer = models.param_shapes(cfg)["layers_0"]
    assert set(layer) == {"attn_norm", "attn", "attn_post_norm", "mlp_norm", "mlp", "mlp_post_norm"}
    assert layer["attn"]["q_norm"]["scale"].shape == (cfg.head_dim,)
    assert [cfg.layer_window(i) for i in range(4)] == [4, None, 4, None]
    assert [cfg.layer_rope(i)[0] for i in range(4)] == [100.0, 100000.0, 100.0, 100000.0]


def _remat_model():
    from clp_jax.models.config import TransformerConfig

    cfg = TransformerConfig(arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, intermediate_size=48, norm="rmsnorm", norm_eps=1e-6, activation="silu",
                            gated_mlp=True, position="rope", tie_word_embeddings=False, norm_bias=False)
    params = models.init_params(cfg, jax.random.key(0))
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jax.numpy.int32)
    return cfg, params, lambda c: (lambda p: jax.numpy.mean(models.apply(p, c, tokens) ** 2))


def test_remat_policies_keep_the_gradients():
    from clp_jax.models.config import REMAT_POLICIES

    cfg, params, loss = _remat_model()
    ref = jax.jit(jax.grad(loss(cfg.replace(remat="none"))))(params)
    for policy in REMAT_POLICIES[1:]:
        grads = jax.jit(jax.grad(loss(cfg.replace(remat=policy))))(params)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-7, err_msg=policy)


@pytest.mark.parametrize("policy", ["full", "minimal", "save_dot_with_context_except_mlp", "save_dot_except_mlp",
                                    "save_qkv_proj"])
def test_remat_policies_save_what_they_name(policy, capsys):
    """The backward pass keeps exactly the policy's named intermediates, once per layer (MaxText's meanings);
    mlpwo never, as only the residual add reads it and its derivative needs no input."""
    import re

    cfg, params, loss = _remat_model()
    jax.ad_checkpoint.print_saved_residuals(loss(cfg.replace(remat=policy)), params)
    saved = re.findall(r"named '(\w+)'", capsys.readouterr().out)
    expected = {"full": set(), "save_qkv_proj": {"query_proj", "key_proj", "value_proj"}}
    expected["save_dot_except_mlp"] = expected["save_qkv_proj"] | {"out_proj"}
    expected["save_dot_with_context_except_mlp"] = expected["save_dot_except_mlp"] | {"context"}
    expected["minimal"] = expected["save_dot_except_mlp"] | {"mlpwi_0", "mlpwi_1"}  # gated MLP
    assert sorted(saved) == sorted(list(expected[policy]) * cfg.num_layers)


def test_remat_true_and_false_are_full_and_none():
    cfg, _, _ = _remat_model()
    assert cfg.replace(remat=True).remat == "full" and cfg.replace(remat=False).remat == "none"
    with pytest.raises(ValueError, match="remat='sometimes'"):
        cfg.replace(remat="sometimes")
