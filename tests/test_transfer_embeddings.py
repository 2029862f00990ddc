"""CLP-Transfer embeddings against plain float64 numpy re-statements, on 1 and 8 simulated devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from clp_jax.errors import ClpError
from clp_jax.sharding import make_mesh
from clp_jax.transfer.embeddings import STRATEGIES, init_target_embeddings
from clp_jax.transfer.weights import sparsemax

VS, VT, D, DH, N_OVERLAP = 300, 257, 48, 32, 120
ZERO_ROW, NEGATIVE_ROW = 3, 5  # missing target ids whose helper rows force the fallback


def one_device_mesh():
    return make_mesh(devices=jax.devices()[:1])


def eight_device_mesh(data: int, fsdp: int, tensor: int):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return make_mesh(data, fsdp, tensor, devices=jax.devices()[:8])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(VS, D)).astype(np.float32)
    # A shared offset keeps most cosine sums clearly positive, as in real helper embeddings.
    helper = (rng.normal(size=(VT, DH)) + 0.7).astype(np.float32)
    candidates = np.setdiff1d(np.arange(VT), [ZERO_ROW, NEGATIVE_ROW])
    overlap_target = rng.choice(candidates, N_OVERLAP, replace=False)
    overlap_source = rng.choice(VS, N_OVERLAP, replace=False)
    units = helper[overlap_target] / np.linalg.norm(helper[overlap_target], axis=1, keepdims=True)
    helper[ZERO_ROW] = 0.0
    helper[NEGATIVE_ROW] = -units.sum(axis=0)
    return source, helper, overlap_target, overlap_source


def cosines(helper, overlap_target):
    """cos(H_i, H_j) for every target i and overlap token j, in float64; zero rows give 0."""
    h = helper.astype(np.float64)
    norm = np.linalg.norm(h, axis=1, keepdims=True)
    unit = np.divide(h, norm, out=np.zeros_like(h), where=norm > 0)
    return unit @ unit[overlap_target].T


def oracle(strategy, source, helper, overlap_target, overlap_source, top_k=10, temperature=0.1):
    """Target embeddings in float64 and the degenerate target ids, straight from the method's definition."""
    s = np.asarray(source, dtype=np.float64)
    rows = s[overlap_source]
    cos = cosines(helper, overlap_target)
    out = np.empty((helper.shape[0], s.shape[1]))
    degenerate = []
    for i in range(helper.shape[0]):
        zero_helper = not np.any(helper[i])
        if strategy == "clp":
            total = cos[i].sum()
            if zero_helper or not np.isfinite(total) or total <= 0:
                degenerate.append(i)
                out[i] = rows.mean(axis=0)
            else:
                out[i] = (cos[i] / total) @ rows
        elif zero_helper:
            degenerate.append(i)
            out[i] = rows.mean(axis=0)
        elif strategy == "clp-topk":
            best = np.argsort(-cos[i], kind="stable")[:top_k]
            w = np.exp((cos[i, best] - cos[i, best].max()) / temperature)
            out[i] = (w / w.sum()) @ rows[best]
        else:
            out[i] = sparsemax_bisection(cos[i] / temperature) @ rows
    out[overlap_target] = rows
    degenerate = np.setdiff1d(degenerate, overlap_target)
    return out, degenerate


def sparsemax_bisection(z):
    """The simplex projection max(z - tau, 0) with sum 1, tau found by bisection (not by sorting)."""
    lo, hi = z.max() - 1.0, z.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        lo, hi = (tau, hi) if np.maximum(z - tau, 0).sum() > 1 else (lo, tau)
    return np.maximum(z - (lo + hi) / 2, 0)


def run(strategy, data, mesh=None, source=None, **kw):
    src, helper, overlap_target, overlap_source = data
    source = [src] if source is None else source
    return init_target_embeddings(
        strategy, source, helper, overlap_target, overlap_source, VT, mesh=mesh or one_device_mesh(), **kw
    )


def row_relative_error(got, want):
    got = np.asarray(got, dtype=np.float64)
    return np.max(np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1))


@pytest.mark.parametrize("strategy", ["clp", "clp-topk", "clp-sparsemax"])
def test_helper_strategies_match_float64_oracle(data, strategy):
    source, _, overlap_target, overlap_source = data
    (out,), stats = run(strategy, data, block_size=16)
    want, degenerate = oracle(strategy, *data)
    assert out.shape == (VT, D) and out.dtype == jnp.float32
    out = np.asarray(out)
    np.testing.assert_array_equal(out[overlap_target], source[overlap_source])
    assert row_relative_error(out, want) < 1e-5
    assert stats.n_overlap == N_OVERLAP and stats.n_missing == VT - N_OVERLAP
    np.testing.assert_array_equal(stats.degenerate_target_ids, degenerate)
    assert stats.n_degenerate == len(degenerate)


def test_clp_degenerate_rows_get_mean_of_overlap_rows(data):
    source, _, _, overlap_source = data
    (out,), stats = run("clp", data)
    np.testing.assert_array_equal(stats.degenerate_target_ids, [ZERO_ROW, NEGATIVE_ROW])
    mean = source[overlap_source].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(np.asarray(out)[[ZERO_ROW, NEGATIVE_ROW]], [mean, mean], rtol=1e-5, atol=1e-6)
    assert stats.params["fallback"] == "mean of the overlapping source rows"


def test_bfloat16_in_bfloat16_out(data):
    source, _, overlap_target, overlap_source = data
    bf16 = source.astype(ml_dtypes.bfloat16)
    (out,), _ = run("clp", data, source=[bf16])
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out)
    np.testing.assert_array_equal(out[overlap_target].view(np.uint16), bf16[overlap_source].view(np.uint16))
    want, _ = oracle("clp", bf16.astype(np.float64), *data[1:])
    assert row_relative_error(out, want) < 1e-2  # bfloat16 rounding of the output, nothing more


def test_untied_matrices_share_weights(data):
    _, helper, overlap_target, overlap_source = data
    lm_head = np.random.default_rng(1).normal(size=(VS, 40)).astype(np.float32)
    (emb, head, head_bf16), _ = run("clp", data, source=[data[0], lm_head, lm_head.astype(ml_dtypes.bfloat16)])
    assert emb.shape == (VT, D) and head.shape == (VT, 40) and head_bf16.dtype == jnp.bfloat16
    want_emb, _ = oracle("clp", *data)
    want_head, _ = oracle("clp", lm_head, helper, overlap_target, overlap_source)
    assert row_relative_error(emb, want_emb) < 1e-5
    assert row_relative_error(head, want_head) < 1e-5
    assert row_relative_error(head_bf16, want_head) < 1e-2


def test_sparsemax_is_sparse_sums_to_one_and_matches_bisection():
    z = np.random.default_rng(2).normal(size=(6, 50)).astype(np.float32) * 3
    p = np.asarray(sparsemax(jnp.asarray(z)))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert (p == 0).any(axis=1).all() and (p >= 0).all()
    np.testing.assert_allclose(p, [sparsemax_bisection(r.astype(np.float64)) for r in z], atol=1e-6)


def test_mean_strategy_copies_overlap_and_fills_with_overlap_mean(data):
    source, _, overlap_target, overlap_source = data
    (out,), stats = run("mean", data)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[overlap_target], source[overlap_source])
    missing = np.setdiff1d(np.arange(VT), overlap_target)
    mean = source[overlap_source].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(out[missing], np.broadcast_to(mean, (missing.size, D)), rtol=1e-5, atol=1e-6)
    assert stats.n_degenerate == 0


def test_random_matches_column_statistics_and_is_seeded(data):
    rng = np.random.default_rng(3)
    source = (rng.normal(size=(VS, D)) * np.linspace(0.5, 2, D) + np.linspace(-1, 1, D)).astype(np.float32)
    (a,), stats = run("random", data, source=[source], seed=7)
    (b,), _ = run("random", data, source=[source], seed=7)
    (c,), _ = run("random", data, source=[source], seed=8)
    a = np.asarray(a, dtype=np.float64)
    np.testing.assert_array_equal(a, np.asarray(b))
    assert not np.allclose(a, np.asarray(c))
    std = source.std(axis=0)
    assert np.all(np.abs(a.mean(0) - source.mean(0)) < 4 * std / np.sqrt(VT))
    assert np.all(np.abs(a.std(0) / std - 1) < 4 / np.sqrt(2 * VT))
    assert stats.params == {"seed": 7}


def test_overlap_strategy_copies_overlap_and_is_random_elsewhere(data):
    source, _, overlap_target, overlap_source = data
    (out,), _ = run("overlap", data, seed=5)
    (rand,), _ = run("random", data, seed=5)
    out, rand = np.asarray(out), np.asarray(rand)
    np.testing.assert_array_equal(out[overlap_target], source[overlap_source])
    missing = np.setdiff1d(np.arange(VT), overlap_target)
    np.testing.assert_array_equal(out[missing], rand[missing])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 2, 4), (2, 4, 1)])
def test_sharded_equals_one_device(data, strategy, shape):
    lm_head = np.random.default_rng(4).normal(size=(VS, 24)).astype(np.float32)
    sources = [data[0], lm_head]
    single, stats1 = run(strategy, data, source=sources, block_size=32)
    sharded, stats8 = run(strategy, data, mesh=eight_device_mesh(*shape), source=sources, block_size=32)
    for a, b in zip(single, sharded, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(stats1.degenerate_target_ids, stats8.degenerate_target_ids)


@pytest.mark.parametrize("strategy", ["clp", "clp-sparsemax"])
def test_block_size_does_not_change_result(data, strategy):
    (small,), _ = run(strategy, data, block_size=7)
    (large,), stats = run(strategy, data, block_size=4096)
    assert stats.params["block_size"] == VT - N_OVERLAP  # capped at the missing count
    # Matmul kernels differ with the block's row count; sparsemax's 1/temperature amplifies the rounding.
    assert row_relative_error(small, np.asarray(large, dtype=np.float64)) < 1e-5


def test_output_rows_sharded_along_vocab(data):
    mesh = eight_device_mesh(1, 8, 1)
    source, helper, overlap_target, overlap_source = data
    keep = overlap_target < 256
    (out,), _ = init_target_embeddings(
        "clp", [source], helper[:256], overlap_target[keep], overlap_source[keep], 256, mesh=mesh
    )
    assert out.sharding.spec[0] == "fsdp" and out.addressable_shards[0].data.shape == (32, D)
    (exact,), _ = run("clp", data, mesh=mesh)
    (padded,), _ = run("clp", data, mesh=mesh, padded=True)
    assert padded.shape == (264, D) and padded.sharding.spec[0] == "fsdp"
    np.testing.assert_array_equal(np.asarray(padded)[:VT], np.asarray(exact))
    assert not np.asarray(padded)[VT:].any()


def test_errors_say_what_is_wrong(data):
    source, helper, overlap_target, overlap_source = data
    mesh = one_device_mesh()

    def call(strategy="clp", src=(source,), h=helper, ot=overlap_target, os_=overlap_source, vt=VT, **kw):
        return init_target_embeddings(strategy, src, h, ot, os_, vt, mesh=mesh, **kw)

    with pytest.raises(ValueError, match="valid strategies: clp, clp-topk"):
        call("wechsel")
    empty = np.zeros(0, np.int64)
    with pytest.raises(ClpError, match="CLP needs tokens shared.*'random' and 'from-scratch'"):
        call(ot=empty, os_=empty)
    with pytest.raises(ValueError, match="needs the helper"):
        call(h=None)
    with pytest.raises(ValueError, match="expected 257 rows"):
        call(h=helper[:-1])
    with pytest.raises(ValueError, match=r"overlap_source: ids must lie in \[0, 300\)"):
        call(os_=np.where(np.arange(N_OVERLAP) == 0, VS, overlap_source))
    with pytest.raises(ValueError, match=r"overlap_target: ids must lie in \[0, 257\)"):
        call(ot=np.where(np.arange(N_OVERLAP) == 0, -1, overlap_target))
    with pytest.raises(ValueError, match="repeated"):
        call(ot=np.concatenate([overlap_target[:-1], overlap_target[:1]]))
    with pytest.raises(ValueError, match="equal length"):
        call(os_=overlap_source[:-1])
    (rand,), stats = call("random", h=None, ot=empty, os_=empty)
    assert rand.shape == (VT, D) and stats.n_overlap == 0
