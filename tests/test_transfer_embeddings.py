"""CLP-Transfer embeddings against plain float64 numpy re-statements, on 1 and 8 simulated devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from clp_jax.errors import ClpError
from clp_jax.sharding import make_mesh
from clp_jax.transfer.block_rows import sparsemax
from clp_jax.transfer.embeddings import STRATEGIES, init_target_embeddings

VS, VT, D, DH, N_OVERLAP = 300, 257, 48, 32, 120
ZERO_ROW, NEGATIVE_ROW = 3, 5  # missing target ids whose helper rows force the fallback
OMP_K = 8


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


def oracle(strategy, source, helper, overlap_target, overlap_source, top_k=10, temperature=0.1, center=False,
           min_mean_cos=0.0):
    """Target embeddings in float64 and the degenerate target ids, straight from the method's definition."""
    s = np.asarray(source, dtype=np.float64)
    rows = s[overlap_source]
    h = helper.astype(np.float64)
    cos = cosines(h - h[overlap_target].mean(axis=0) if center else h, overlap_target)
    out = np.empty((helper.shape[0], s.shape[1]))
    degenerate = []
    for i in range(helper.shape[0]):
        zero_helper = not np.any(helper[i])
        if strategy == "clp":
            total = cos[i].sum()
            if zero_helper or not np.isfinite(total) or total <= min_mean_cos * len(overlap_target):
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
    if strategy == "fvt" and "pieces" not in kw:
        kw["pieces"] = random_pieces(overlap_target)
    if strategy == "omp":
        kw.setdefault("omp_k", OMP_K)  # well below DH, where float32 and float64 pick the same atoms
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
def test_sharded_equals_one_device(data, strategy):
    lm_head = np.random.default_rng(4).normal(size=(VS, 24)).astype(np.float32)
    sources = [data[0], lm_head]
    single, stats1 = run(strategy, data, source=sources, block_size=32)
    for shape in [(1, 8, 1), (1, 2, 4), (2, 4, 1)]:  # (data, fsdp, tensor)
        sharded, stats8 = run(strategy, data, mesh=eight_device_mesh(*shape), source=sources, block_size=32)
        for a, b in zip(single, sharded, strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6, err_msg=str(shape))
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


# --- measured departures from the paper: omp, fvt, center_helper, match_norms, ill-conditioned rows ---


def no_pieces_row(overlap_target):
    """A missing target id (not a helper-fallback row) that is given no FVT pieces."""
    return int(np.setdiff1d(np.arange(VT), [*overlap_target, ZERO_ROW, NEGATIVE_ROW])[0])


def random_pieces(overlap_target):
    """1-4 distinct random source ids per target token, -1 padded; one missing token has none."""
    rng = np.random.default_rng(5)
    pieces = np.full((VT, 4), -1)
    for i, count in enumerate(rng.integers(1, 5, VT)):
        pieces[i, :count] = rng.choice(VS, count, replace=False)
    pieces[no_pieces_row(overlap_target)] = -1
    return pieces


def fvt_oracle(source, pieces, overlap_target, overlap_source):
    """FVT in float64: the mean of each token's piece rows; no pieces -> mean of the shared rows."""
    s = np.asarray(source, dtype=np.float64)
    out, fallback = np.empty((VT, s.shape[1])), []
    for i, row in enumerate(pieces):
        ids = row[row >= 0]
        out[i] = s[ids].mean(axis=0) if ids.size else s[overlap_source].mean(axis=0)
        if not ids.size:
            fallback.append(i)
    out[overlap_target] = s[overlap_source]
    return out, np.setdiff1d(fallback, overlap_target)


def omp_row(target, atoms, k, tol=1e-3):
    """Plain OMP in float64: greedy |cos| with the residual, lstsq refit, stop when nothing correlates."""
    norms = np.linalg.norm(atoms, axis=1, keepdims=True)
    units = np.divide(atoms, norms, out=np.zeros_like(atoms), where=norms > 0)
    support, coef, residual = [], np.zeros(0), target
    for _ in range(k):
        corr = np.abs(units @ residual)
        corr[support] = -1
        best = int(np.argmax(corr))
        if corr[best] <= tol * np.linalg.norm(target):
            break
        support.append(best)
        coef = np.linalg.lstsq(atoms[support].T, target, rcond=None)[0]
        residual = target - atoms[support].T @ coef
    return support, coef


def omp_oracle(source, helper, overlap_target, overlap_source, k, center=False):
    """OMP transfer in float64; centered: offsets from the shared rows' means in both spaces."""
    s, h = np.asarray(source, dtype=np.float64), helper.astype(np.float64)
    rows = s[overlap_source]
    mean_s = rows.mean(axis=0)
    if center:
        h = h - h[overlap_target].mean(axis=0)
    out, degenerate = np.empty((VT, s.shape[1])), []
    for i in range(VT):
        if not np.any(helper[i]):
            out[i] = mean_s
            degenerate.append(i)
            continue
        support, coef = omp_row(h[i], h[overlap_target], k)
        out[i] = mean_s + coef @ (rows[support] - mean_s) if center else coef @ rows[support]
    out[overlap_target] = rows
    return out, np.setdiff1d(degenerate, overlap_target)


def norm_guarded(outs, matrices, overlap_target, overlap_source, factor=1.5):
    """The norm rule on oracle rows of all matrices at once: a missing row longer than factor x its matrix's
    longest source row, in any matrix, gets the mean of the shared rows in every matrix; returns its ids."""
    missing = np.setdiff1d(np.arange(VT), overlap_target)
    long = np.zeros(VT, bool)
    for out, matrix in zip(outs, matrices):
        long[missing] |= np.linalg.norm(out[missing], axis=1) > factor * np.linalg.norm(matrix, axis=1).max()
    for out, matrix in zip(outs, matrices):
        out[long] = np.asarray(matrix, dtype=np.float64)[overlap_source].mean(axis=0)
    return np.flatnonzero(long)


def matched_norms(out, source, overlap_target, overlap_source):
    """Missing rows rescaled to the mean row norm of the shared source rows (float64)."""
    s = np.asarray(source, dtype=np.float64)
    missing = np.setdiff1d(np.arange(VT), overlap_target)
    out = out.copy()
    target = np.linalg.norm(s[overlap_source], axis=1).mean()
    out[missing] *= target / np.linalg.norm(out[missing], axis=1, keepdims=True)
    return out


@pytest.fixture(scope="module")
def lm_head():
    return (np.random.default_rng(6).normal(size=(VS, 24)) * 3).astype(np.float32)


@pytest.mark.parametrize("center", [False, True])
def test_omp_matches_float64_oracle(data, lm_head, center):
    source, helper, overlap_target, overlap_source = data
    (emb, head), stats = run("omp", data, source=[source, lm_head], center_helper=center, block_size=16)
    np.testing.assert_array_equal(np.asarray(emb)[overlap_target], source[overlap_source])
    wants = [omp_oracle(m, helper, overlap_target, overlap_source, OMP_K, center) for m in (source, lm_head)]
    long = norm_guarded([w for w, _ in wants], [source, lm_head], overlap_target, overlap_source)
    for got, (want, _) in zip((emb, head), wants):
        assert row_relative_error(got, want) < 1e-4
    assert NEGATIVE_ROW in long  # -(sum of the shared rows) is a long way from any convex combination
    np.testing.assert_array_equal(stats.reason_target_ids["zero_helper"], wants[0][1])
    np.testing.assert_array_equal(stats.reason_target_ids["norm"], long)
    assert stats.reasons == {"zero_helper": 1, "cos_sum": 0, "no_pieces": 0, "norm": len(long)}
    assert stats.params["omp_k"] == OMP_K and stats.params["center_helper"] is center


def test_omp_survives_duplicate_atoms_and_more_steps_than_dimensions():
    from clp_jax.transfer.block_rows import omp_coefficients, unit_rows

    rng = np.random.default_rng(7)
    atoms = rng.normal(size=(12, 4)).astype(np.float32)
    atoms[6:] = atoms[:6]  # every atom twice: the normal equations are singular without the ridge
    target = rng.normal(size=(5, 4)).astype(np.float32)
    target[0] = 2 * atoms[1]  # exactly one atom: OMP must stop after it
    support, coef = jax.jit(omp_coefficients, static_argnums=3)(
        jnp.asarray(target), jnp.asarray(atoms), unit_rows(jnp.asarray(atoms))[0], 10)
    support, coef = np.asarray(support), np.asarray(coef, dtype=np.float64)
    assert np.isfinite(coef).all()
    fit = np.einsum("bk,bkd->bd", coef, atoms[support].astype(np.float64))
    assert np.linalg.norm(fit - target, axis=1).max() < 1e-3 * np.linalg.norm(target, axis=1).min()
    np.testing.assert_allclose(coef[0], [2.0] + [0.0] * 9, atol=1e-5)
    assert support[0, 0] in (1, 7)
    for row, c in zip(support, coef):
        assert len(set(row[c != 0].tolist())) == np.count_nonzero(c)  # no atom is picked twice


def test_fvt_matches_float64_oracle(data, lm_head):
    source, _, overlap_target, overlap_source = data
    pieces = random_pieces(overlap_target)
    (emb, head), stats = run("fvt", data, source=[source, lm_head], pieces=pieces, block_size=16)
    for got, matrix in ((emb, source), (head, lm_head)):
        want, fallback = fvt_oracle(matrix, pieces, overlap_target, overlap_source)
        assert row_relative_error(got, want) < 1e-6
    np.testing.assert_array_equal(np.asarray(emb)[overlap_target], source[overlap_source])
    assert fallback.tolist() == [no_pieces_row(overlap_target)]
    np.testing.assert_array_equal(stats.reason_target_ids["no_pieces"], fallback)
    assert stats.reasons["no_pieces"] == stats.n_degenerate == 1 and stats.params["max_pieces"] == 4
    with pytest.raises(ValueError, match="needs pieces"):
        run("fvt", data, pieces=None)
    with pytest.raises(ValueError, match=r"pieces: ids must lie in \[0, 300\)"):
        run("fvt", data, pieces=np.where(pieces == pieces.max(), VS, pieces))


@pytest.mark.parametrize("strategy", ["clp", "clp-topk", "clp-sparsemax"])
def test_center_helper_matches_float64_oracle(data, lm_head, strategy):
    source, helper, overlap_target, overlap_source = data
    (emb, head), stats = run(strategy, data, source=[source, lm_head], center_helper=True)
    for got, matrix in ((emb, source), (head, lm_head)):
        want, degenerate = oracle(strategy, matrix, helper, overlap_target, overlap_source, center=True,
                                  min_mean_cos=0.01)
        assert row_relative_error(got, want) < 1e-5
    np.testing.assert_array_equal(stats.degenerate_target_ids, degenerate)
    if strategy == "clp":  # centering makes every cosine sum small: most rows get the fallback, all counted
        assert stats.reasons["cos_sum"] > (VT - N_OVERLAP) // 2


@pytest.mark.parametrize("strategy", ["clp", "omp", "fvt"])
def test_match_norms_rescales_computed_rows_to_the_shared_mean_norm(data, lm_head, strategy):
    source, helper, overlap_target, overlap_source = data
    (emb, head), stats = run(strategy, data, source=[source, lm_head], match_norms=True)
    if strategy == "clp":
        plain = [oracle("clp", m, helper, overlap_target, overlap_source)[0] for m in (source, lm_head)]
    elif strategy == "omp":
        plain = [omp_oracle(m, helper, overlap_target, overlap_source, OMP_K)[0] for m in (source, lm_head)]
        norm_guarded(plain, [source, lm_head], overlap_target, overlap_source)
    else:
        pieces = random_pieces(overlap_target)
        plain = [fvt_oracle(m, pieces, overlap_target, overlap_source)[0] for m in (source, lm_head)]
    missing = np.setdiff1d(np.arange(VT), overlap_target)
    for got, want, matrix in zip((emb, head), plain, (source, lm_head)):
        assert row_relative_error(got, matched_norms(want, matrix, overlap_target, overlap_source)) < 1e-4
        shared_mean = np.linalg.norm(matrix[overlap_source], axis=1).mean()
        np.testing.assert_allclose(np.linalg.norm(np.asarray(got)[missing], axis=1), shared_mean, rtol=1e-5)
    assert stats.checks["match_norms"] is True
    for norms, matrix in zip(stats.computed_row_norms, (source, lm_head)):
        np.testing.assert_allclose(norms["mean"], np.linalg.norm(matrix[overlap_source], axis=1).mean(), rtol=1e-5)


def small_sum_helper(data, mean_cos):
    """The fixture's helper with one more missing row whose mean cosine with the shared rows is ``mean_cos``."""
    _, helper, overlap_target, _ = data
    helper = helper.copy()
    units = helper[overlap_target] / np.linalg.norm(helper[overlap_target], axis=1, keepdims=True)
    m = units.sum(axis=0).astype(np.float64)
    row = no_pieces_row(overlap_target)
    w = np.random.default_rng(8).normal(size=DH)
    w -= (w @ m) / (m @ m) * m  # orthogonal to the sum of the shared unit rows ...
    w /= np.linalg.norm(w)
    helper[row] = w + mean_cos * N_OVERLAP / np.linalg.norm(m) * m / np.linalg.norm(m)  # ... plus a little of it
    return helper, row


def test_clp_small_positive_cosine_sum_is_caught_and_reported(data):
    source, _, overlap_target, overlap_source = data
    helper, row = small_sum_helper(data, 1e-3)
    tricky = (source, helper, overlap_target, overlap_source)
    sums = cosines(helper, overlap_target).sum(axis=1)
    assert 0 < sums[row] < 0.01 * N_OVERLAP
    paper, _ = oracle("clp", *tricky)
    longest = np.linalg.norm(source, axis=1).max()
    assert np.linalg.norm(paper[row]) > 5 * longest  # the formula explodes on this row

    (out,), stats = run("clp", tricky)
    np.testing.assert_array_equal(stats.reason_target_ids["cos_sum"], sorted([NEGATIVE_ROW, row]))
    assert stats.reasons == {"zero_helper": 1, "cos_sum": 2, "no_pieces": 0, "norm": 0}
    np.testing.assert_allclose(np.asarray(out)[row], source[overlap_source].mean(axis=0), rtol=1e-5, atol=1e-6)
    keep = np.setdiff1d(np.arange(VT), [row])
    assert row_relative_error(np.asarray(out)[keep], paper[keep]) < 1e-5  # well-conditioned rows stay exact
    assert stats.computed_row_norms[0]["max"] <= 1.5 * longest
    np.testing.assert_allclose(stats.source_row_norms[0]["max"], longest, rtol=1e-6)
    np.testing.assert_allclose(stats.source_row_norms[0]["min"], np.linalg.norm(source, axis=1).min(), rtol=1e-6)

    (out,), stats = run("clp", tricky, min_mean_cos=0.0)  # the paper's rule: the norm check catches it instead
    assert stats.reasons == {"zero_helper": 1, "cos_sum": 1, "no_pieces": 0, "norm": 1}
    assert stats.reason_target_ids["norm"].tolist() == [row]
    (out,), stats = run("clp", tricky, min_mean_cos=0.0, max_norm_factor=np.inf)  # the paper, unguarded
    assert row_relative_error(out, paper) < 1e-4 and stats.reasons["norm"] == 0
    assert stats.computed_row_norms[0]["max"] > 5 * longest


def test_omp_norm_blowup_is_caught_and_reported():
    """Two nearly parallel shared helper rows fit a missing row as 100 x their difference: a huge row."""
    source = np.random.default_rng(9).normal(size=(6, 8)).astype(np.float32)
    eye = np.eye(4, dtype=np.float32)
    helper = np.stack([eye[0], eye[0] + 0.01 * eye[1], eye[2], eye[1], eye[3]])
    overlap_target, overlap_source = np.array([0, 1, 2]), np.array([0, 1, 2])
    args = ("omp", [source], helper, overlap_target, overlap_source, 5)
    (paper,), stats = init_target_embeddings(*args, mesh=one_device_mesh(), omp_k=2, max_norm_factor=np.inf)
    # cond(Gram) = 4e4: the solver's ridge (1e-6 of the diagonal) shrinks the fit by about 2%.
    np.testing.assert_allclose(np.asarray(paper)[3], 100 * (source[1] - source[0]), rtol=0.05)
    assert stats.reasons["norm"] == 0
    (out,), stats = init_target_embeddings(*args, mesh=one_device_mesh(), omp_k=2)
    assert stats.reason_target_ids["norm"].tolist() == [3] and stats.n_degenerate == 1
    np.testing.assert_allclose(np.asarray(out)[3], source[:3].mean(axis=0), rtol=1e-5)
    assert stats.computed_row_norms[0]["max"] <= 1.5 * np.linalg.norm(source, axis=1).max()
