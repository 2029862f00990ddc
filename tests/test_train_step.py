"""The train step against PyTorch (loss, AdamW) and itself: accumulation, 8-device meshes, bf16, NaN skipping."""

import jax
import numpy as np
import optax
import pytest
import torch
from hf_models import make_hf_model
from jax.sharding import PartitionSpec
from oracles import next_token_targets

from clp_jax import models
from clp_jax.data.packing import pack_documents
from clp_jax.errors import ClpError
from clp_jax.eval.heldout import make_heldout_step
from clp_jax.hf.reader import load_params
from clp_jax.sharding import logical_to_spec, make_mesh
from clp_jax.train.flops import matmul_params, train_step_flops
from clp_jax.train.loss import token_targets
from clp_jax.train.optimizer import OptimizerConfig, decay_mask, make_optimizer
from clp_jax.train.state import abstract_state, create_sharded_state, state_shardings
from clp_jax.train.step import check_batch_shape, make_train_step

T, ROWS, VOCAB = 16, 16, 300
OPT = OptimizerConfig(learning_rate=1e-3, schedule="constant", total_steps=100, b1=0.9, b2=0.95, eps=1e-8,
                      weight_decay=0.1, max_grad_norm=0.5)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time; same HLO, same numerics


def one_device():
    return make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(cfg, host params, hf dir) of the tiny random GPT-2 from tests/hf_models.py."""
    path = tmp_path_factory.mktemp("gpt2")
    make_hf_model("gpt2").save_pretrained(path)
    cfg, params = load_params(str(path), one_device(), progress=False)
    return cfg, jax.device_get(params), str(path)


@pytest.fixture(scope="module")
def steps(model):
    """make_train_step per (mesh shape, grad accumulation, model config) on the tiny GPT-2, each compiled once."""
    cfg, params, _ = model
    cache = {}

    def get(shape=(1, 1, 1), accum=1, cfg=cfg):
        # XLA takes seconds per compile on CPU, so the one-device step also serves the skip_nonfinite test
        # (skipping changes nothing for finite steps); the sharded ones use the default, skip_nonfinite=False.
        skip = shape == (1, 1, 1)
        key = (shape, accum, cfg)
        if key not in cache:
            mesh = one_device() if shape == (1, 1, 1) else make_mesh(*shape)
            cache[key] = mesh, make_train_step(cfg, make_optimizer(OPT, params), mesh, accum, skip, FAST_COMPILE)
        return cache[key]

    return get


def packed_batch(seed, rows=ROWS):
    """``rows`` packed rows of random documents (several per row, some padding), as int32 arrays."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=rows * 4)
    packed = pack_documents(rng.integers(1, VOCAB, size=lengths.sum()), np.r_[0, np.cumsum(lengths)], T, eos_id=0)
    assert len(packed) >= rows
    return {k: v[:rows] for k, v in packed.as_dict().items()}


def padded_batch(seed, rows=ROWS):
    """One document per row, right-padded (segment 0): what transformers' ``labels=-100`` loss understands."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, size=rows)
    lengths[0] = T
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    tokens = rng.integers(0, VOCAB, size=(rows, T)).astype(np.int32) * seg
    return {"tokens": tokens, "segment_ids": seg, "positions": np.tile(np.arange(T, dtype=np.int32), (rows, 1))}


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_params_close(ours, want, atol):
    """All leaves within ``atol``, except the attention key biases, which only must stay within a few Adam steps.

    Their true gradient is exactly 0 (softmax ignores a constant added to every key's score), so Adam, which
    normalizes each gradient by its own size, turns float noise there into steps of about +-learning_rate.
    """
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(want)):
        name = jax.tree_util.keystr(path)
        tol = 6 * OPT.learning_rate if name.endswith("['k']['bias']") else atol
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0, err_msg=name)


def test_token_targets_match_packing():
    batch = packed_batch(0)
    targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
    ours = token_targets(batch["tokens"], batch["segment_ids"])
    np.testing.assert_array_equal(ours[0], targets)
    np.testing.assert_array_equal(ours[1], weights)


def torch_loss(hf, batch):
    ids = torch.as_tensor(batch["tokens"], dtype=torch.long)
    labels = ids.masked_fill(torch.as_tensor(batch["segment_ids"]) == 0, -100)
    return hf(input_ids=ids, attention_mask=torch.as_tensor(batch["segment_ids"]), labels=labels).loss


def test_loss_matches_transformers(model, steps):
    """The loss the train step reports (computed before its update) is transformers' loss of the batch."""
    cfg, params, path = model
    hf = make_hf_model("gpt2")
    batch = padded_batch(1)
    mesh, step = steps()
    _, metrics = step(create_sharded_state(params, cfg, make_optimizer(OPT, params), mesh), batch)
    with torch.no_grad():
        ref = float(torch_loss(hf, batch))
    assert float(metrics["loss"]) == pytest.approx(ref, abs=1e-5)
    assert float(metrics["tokens"]) == (batch["segment_ids"].sum(1) - 1).sum()


def test_soft_capped_loss_matches_transformers(tmp_path):
    """Gemma 2's final logit soft-cap reaches the fused training loss."""
    hf = make_hf_model("gemma2")
    hf.save_pretrained(tmp_path)
    cfg, params = load_params(str(tmp_path), one_device(), progress=False)
    assert cfg.final_softcap is not None
    batch = padded_batch(1)
    mesh = one_device()
    step = make_train_step(cfg, optax.sgd(0.0), mesh, compiler_options=FAST_COMPILE)
    _, metrics = step(create_sharded_state(params, cfg, optax.sgd(0.0), mesh), batch)
    with torch.no_grad():
        ref = float(torch_loss(hf, batch))
    assert float(metrics["loss"]) == pytest.approx(ref, abs=1e-5)


def test_weighted_loss_and_heldout_step_match_float64(model):
    """Packed segments and SFT loss_weights against float64 numpy, on a (2, 2, 2) mesh; with ``bytes``, the
    held-out step also sums the weighted bytes of the targets (token t + 1)."""
    cfg, params, _ = model
    batch = packed_batch(2)
    batch["loss_weights"] = np.random.default_rng(3).uniform(0, 2, size=(ROWS, T)).astype(np.float32)
    apply = jax.jit(lambda p, b: models.apply(p, cfg, b["tokens"], b["positions"], b["segment_ids"]))
    logits = np.asarray(apply(params, batch), np.float64)
    targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
    weights = weights * batch["loss_weights"]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    mesh = make_mesh(2, 2, 2)
    state = create_sharded_state(params, cfg, optax.sgd(0.0), mesh)
    heldout_step = make_heldout_step(cfg, mesh)
    sums = heldout_step(state.params, batch)
    assert float(sums["tokens"]) == pytest.approx(weights.sum(), rel=1e-6)
    assert float(sums["loss_sum"]) == pytest.approx((nll * weights).sum(), rel=1e-5)
    assert float(sums["bytes"]) == 0.0  # no bytes in the batch
    batch["bytes"] = np.random.default_rng(4).integers(0, 5, size=(ROWS, T)).astype(np.int32)
    with_bytes = heldout_step(state.params, batch)
    assert float(with_bytes["bytes"]) == pytest.approx((weights[:, :-1] * batch["bytes"][:, 1:]).sum(), rel=1e-6)
    assert float(with_bytes["loss_sum"]) == float(sums["loss_sum"])


def test_adamw_steps_match_torch(model, steps, tmp_path):
    """Three clipped AdamW steps (decay on matrices only) equal torch.optim.AdamW on the same GPT-2."""
    cfg, params, _ = model
    hf = make_hf_model("gpt2")
    named = list(hf.named_parameters())
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": OPT.weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=OPT.learning_rate, betas=(OPT.b1, OPT.b2), eps=OPT.eps)
    mesh, step = steps()
    state = create_sharded_state(params, cfg, make_optimizer(OPT, params), mesh)
    for i in range(3):
        batch = padded_batch(10 + i)
        torch_opt.zero_grad()
        ref = torch_loss(hf, batch)
        ref.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), OPT.max_grad_norm)
        torch_opt.step()
        state, metrics = step(state, batch)
        assert float(metrics["loss"]) == pytest.approx(ref.item(), abs=1e-5)
        assert float(metrics["grad_norm"]) > OPT.max_grad_norm  # so clipping was exercised
    hf.save_pretrained(tmp_path)
    _, want = load_params(str(tmp_path), one_device(), progress=False)
    assert_params_close(state.params, want, atol=1e-5)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(host(state.params)),
                                                           jax.tree.leaves(params))) > 2e-3  # it did move


@pytest.fixture(scope="module")
def run(model, steps):
    """``run(shape, accum, seeds) -> (state, host metrics)``: steps on ``packed_batch(seed)`` from a fresh state."""
    cfg, params, _ = model
    cache = {}

    def get(shape, accum, seeds):
        if (shape, accum, seeds) not in cache:
            mesh, step = steps(shape, accum)
            state = create_sharded_state(params, cfg, make_optimizer(OPT, params), mesh)
            for seed in seeds:
                state, metrics = step(state, packed_batch(seed))
            cache[shape, accum, seeds] = state, host(metrics)
        return cache[shape, accum, seeds]

    return get


def test_grad_accumulation_equals_big_batch(run):
    """4 micro-batches of 4 rows (unequal token counts) = one batch of 16, after an AdamW step (on 8 devices)."""
    big, m1 = run((1, 1, 1), 1, (4,))
    accumulated, m4 = run((2, 2, 2), 4, (4,))
    assert m1["tokens"] == m4["tokens"]
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    # Adam's first moment is 0.1 x the clipped gradient: linear in it, so it shows the gradients agree.
    mu_acc, mu_big = (host(optax.tree_utils.tree_get(s.opt_state, "mu")) for s in (accumulated, big))
    assert_params_close(mu_acc, mu_big, atol=1e-8)
    assert_params_close(host(accumulated.params), host(big.params), atol=1e-5)


@pytest.mark.parametrize("shape, accum", [((8, 1, 1), 1), ((2, 2, 2), 4), ((1, 4, 2), 1)])
def test_sharded_training_matches_one_device(model, steps, run, shape, accum):
    cfg, seeds = model[0], (20, 21, 22)
    want, _ = run((1, 1, 1), 1, seeds)
    state, _ = run(shape, accum, seeds)
    assert_params_close(host(state.params), host(want.params), atol=1e-5)

    mesh = steps(shape, accum)[0]
    axes = models.param_axes(cfg)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    for (path, p), m, a in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(mu),
                               jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        want_spec = logical_to_spec(a, p.shape, mesh)
        for leaf in (p, m):
            assert leaf.sharding.mesh == mesh and leaf.sharding.spec == want_spec, jax.tree_util.keystr(path)
    assert int(state.step) == 3
    scalars = [x for x in jax.tree.leaves(state) if x.ndim == 0]
    assert len(scalars) >= 3 and all(x.sharding.is_fully_replicated for x in scalars)  # step, counts, learning rate
    if shape == (2, 2, 2):
        assert state.params["embed"]["embedding"].sharding.spec[0] == ("tensor", "fsdp")
        assert mu["layers_0"]["mlp"]["up"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")


def test_chunked_loss_training_matches_whole_sequence(model, steps, run):
    """model.logits_chunk = 5 (T = 16: three chunks and a padded one) on 8 devices = whole-sequence logits on 1."""
    cfg, params, _ = model
    seeds = (20, 21, 22)
    want, want_metrics = run((1, 1, 1), 1, seeds)
    mesh, step = steps((2, 2, 2), 1, cfg.replace(logits_chunk=5))
    state = create_sharded_state(params, cfg, make_optimizer(OPT, params), mesh)
    for seed in seeds:
        state, metrics = step(state, packed_batch(seed))
    assert float(metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(want_metrics["grad_norm"]), rel=1e-5)
    assert_params_close(host(state.params), host(want.params), atol=1e-5)


def test_abstract_state_matches_created_state(model):
    cfg, params, _ = model
    mesh, tx = make_mesh(2, 2, 2), make_optimizer(OPT.model_copy(update={"embeddings_only_steps": 2}), params)
    state = create_sharded_state(params, cfg, tx, mesh)
    abstract = abstract_state(cfg, mesh, tx)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), jax.tree.leaves(state_shardings(cfg, mesh,
                                                                                                          tx))):
        assert (a.shape, a.dtype) == (x.shape, x.dtype) and a.sharding == x.sharding == s


def test_bf16_compute_keeps_float32_master_weights(model, steps):
    cfg, params, _ = model
    bf16 = cfg.replace(dtype="bfloat16")
    batch = packed_batch(5)
    losses = []
    for c in (cfg, bf16):
        mesh, step = steps(cfg=c)
        state, metrics = step(create_sharded_state(params, c, make_optimizer(OPT, params), mesh), batch)
        losses.append(float(metrics["loss"]))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, "nu"))} == {np.dtype("float32")}
    assert losses[1] == pytest.approx(losses[0], rel=1e-2) and losses[1] != losses[0]


def bad_batch(seed):
    """A token id outside the vocabulary embeds as NaN (``jnp.take`` fills out-of-range rows with NaN)."""
    batch = packed_batch(seed)
    batch["tokens"][2, 5] = VOCAB + 3
    return batch


def test_skip_nonfinite_leaves_state_unchanged(model, steps):
    cfg, params, _ = model
    mesh, step = steps()  # skip_nonfinite=True
    state = create_sharded_state(params, cfg, make_optimizer(OPT, params), mesh)
    state, _ = step(state, packed_batch(6))
    before = host(state)
    state, metrics = step(state, bad_batch(6))
    assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 2
    for x, y in zip(jax.tree.leaves(host(state.params)) + jax.tree.leaves(host(state.opt_state)),
                    jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(x, y)
    state, metrics = step(state, packed_batch(7))
    assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(host(state.params["embed"]["embedding"]), before.params["embed"]["embedding"])


def test_nonfinite_reported_without_skip(model, steps):
    cfg, params, _ = model
    mesh, step = steps((8, 1, 1))  # skip_nonfinite=False: the step is applied, the caller must stop
    state, metrics = step(create_sharded_state(params, cfg, make_optimizer(OPT, params), mesh), bad_batch(7))
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert not np.isfinite(float(metrics["param_norm"]))


def test_repeated_steps_with_donation(model, steps):
    cfg, params, _ = model
    mesh, step = steps()
    state = create_sharded_state(params, cfg, make_optimizer(OPT, params), mesh)
    batch, losses = packed_batch(8), []
    for _ in range(5):
        old = state
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert old.params["embed"]["embedding"].is_deleted()  # donated, reused for the new state
    assert int(state.step) == 5 and losses[-1] < losses[0]
    assert float(metrics["learning_rate"]) == pytest.approx(OPT.learning_rate)
    assert float(metrics["tokens"]) == next_token_targets(batch["tokens"], batch["segment_ids"])[1].sum()


def test_batch_shape_errors(model, steps):
    mesh, step = steps((2, 2, 2), 4)
    check_batch_shape((16, T), mesh, 4)
    with pytest.raises(ClpError, match=r"multiple of grad_accum_steps \(4\) x data\*fsdp devices \(4\) = 16"):
        check_batch_shape((12, T), mesh, 4)
    state = create_sharded_state(model[1], model[0], make_optimizer(OPT), mesh)
    with pytest.raises(ClpError, match="multiple of grad_accum_steps"):
        step(state, packed_batch(0, rows=12))  # divides the 4 batch devices, not 4 micro-batches of them


@pytest.mark.parametrize("tied", [True, False])
def test_flops_count_matmul_weights(model, tied):
    cfg = model[0].replace(tie_word_embeddings=tied)
    sizes = {jax.tree_util.keystr(p): int(np.prod(s.shape))
             for p, s in jax.tree_util.tree_leaves_with_path(models.param_shapes(cfg))}
    tables = sizes["['embed']['embedding']"] + sizes["['pos_embed']['embedding']"]
    n = sum(sizes.values()) - tables + (cfg.vocab_size * cfg.hidden_size if tied else 0)
    assert matmul_params(cfg) == n
    assert train_step_flops(cfg, 1000, T) == 1000 * (6 * n + 12 * cfg.num_layers * cfg.hidden_size * T)
    assert decay_mask(models.param_shapes(cfg))["embed"]["embedding"]


def test_flops_count_attention_over_sliding_windows(model):
    cfg = model[0].replace(num_layers=3, sliding_window=4, sliding_layers=(True, False, True))
    attention = 12 * cfg.hidden_size * (4 + T + 4)
    assert train_step_flops(cfg, 1000, T) == 1000 * (6 * matmul_params(cfg) + attention)
