"""The certified search engines against a direct fp64 brute force.

Every test compares with ``brute`` (all pairs, fp64 differences) or with a fact planted in the
data; both engines (torch: symmetric block GEMM, faiss: k-NN screening) run on the same inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import collide.search.blocks as blocks
import collide.search.symmetric as symmetric
from collide.errors import CollideError
from collide.search import min_pairwise, pick_backend
from collide.search.bounds import pair_bound, screening_constant, underflow_term

faiss = pytest.importorskip("faiss")
ENGINES = ("torch", "faiss")


def brute(x: np.ndarray, threshold: float):
    """(min L2, set of pairs attaining it, {(i, j): L2} of collisions, per-row nn L2) in fp64, valid rows only."""
    x = np.asarray(x, np.float64)
    rows = np.flatnonzero(np.isfinite(x).all(1))
    nn = np.full(len(x), np.nan)
    if len(rows) < 2:
        nn[rows] = np.inf
        return math.inf, set(), {}, nn
    dist = np.sqrt(((x[rows, None, :] - x[None, rows, :]) ** 2).sum(-1))
    iu, ju = np.triu_indices(len(rows), 1)
    pairs = dist[iu, ju]
    best = pairs.min()
    np.fill_diagonal(dist, np.inf)
    nn[rows] = dist.min(1)
    at = {(int(rows[i]), int(rows[j])) for i, j, v in zip(iu, ju, pairs) if v == best}
    coll = {(int(rows[i]), int(rows[j])): float(v) for i, j, v in zip(iu, ju, pairs) if v < threshold}
    return float(best), at, coll, nn


def assert_matches_brute(res, x, threshold):
    best, at, coll, nn = brute(x, threshold)
    assert res.certified, res.uncertified_reason
    if math.isinf(best):
        assert res.distance == math.inf and res.pair is None
    else:
        assert res.distance == pytest.approx(best, rel=1e-12, abs=1e-300)
        i, j = res.pair
        assert i < j
        pd = math.sqrt(float(((np.float64(x[i]) - np.float64(x[j])) ** 2).sum()))
        assert pd == pytest.approx(best, rel=1e-12, abs=1e-300)  # a pair attaining the minimum (ties allowed)
        if len(at) == 1:
            assert res.pair == next(iter(at))
    got = {(i, j): dist for i, j, dist in res.collisions.tolist()}
    assert set(got) == set(coll)
    for key, dist in got.items():
        assert dist == pytest.approx(coll[key], rel=1e-12, abs=1e-300)
    assert res.n_collisions == len(coll)
    assert [c[2] for c in res.collisions.tolist()] == sorted(c[2] for c in res.collisions.tolist())
    valid = np.isfinite(np.asarray(x, np.float64)).all(1)
    assert res.n_pairs == valid.sum() * (valid.sum() - 1) // 2
    assert res.invalid_rows == np.flatnonzero(~valid).tolist()
    assert np.isnan(res.nn_distance[~valid]).all()
    # nn_distance is an exact distance to some other row: never below the true nearest neighbour
    assert (res.nn_distance[valid] >= nn[valid] * (1 - 1e-12)).all()
    if valid.sum() >= 2:
        assert np.nanmin(res.nn_distance) == pytest.approx(best, rel=1e-12, abs=1e-300)


def massive_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """fp32 rows with norms 1e3..1e4: a few massive dimensions shared by all rows plus a random part."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * 60.0
    x[:, :4] += rng.uniform(300, 1500, size=4)  # massive dims, same order for every row
    x *= rng.uniform(1.0, 3.0, size=(n, 1))
    return x.astype(np.float32)


# ---------------------------------------------------------------------------- the fp32 trap


@pytest.mark.parametrize("engine", ENGINES)
def test_planted_near_duplicates_exactly_flagged_where_fp32_is_off(engine):
    n, d = 2000, 128
    x = massive_rows(n, d)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert 1e3 <= norms.min() and norms.max() <= 1e4
    planted = {}
    for (a, b), delta in zip(((10, 1500), (700, 1999), (3, 4)), (1e-7, 5e-7, 2e-6)):
        x[b] = x[a]
        x[a, 100], x[b, 100] = 0.0, np.float32(delta)  # a quiet dimension: exact distance fp32(delta)
        planted[(a, b)] = float(np.float32(delta))
    res = min_pairwise(x, 1e-6, engine, block_rows=512)
    assert res.certified and res.uncertified_reason is None
    assert res.backend == engine and res.precision == "fp32"
    assert {(i, j) for i, j, _ in res.collisions.tolist()} == {(10, 1500), (700, 1999)}
    for i, j, dist in res.collisions.tolist():
        direct = math.sqrt(float(((x[i].astype(np.float64) - x[j].astype(np.float64)) ** 2).sum()))
        assert dist == pytest.approx(direct, rel=1e-12) and dist == pytest.approx(planted[(i, j)], rel=1e-12)
    assert res.pair == (10, 1500) and res.distance == pytest.approx(planted[(10, 1500)], rel=1e-12)
    assert 2e-6 * 0.99 < res.nn_distance[3] < 2e-6 * 1.01  # the 2e-6 pair: seen, not a collision
    # the trap is real: plain fp32 screening of the same rows is off by far more than the threshold,
    # and flags the wrong pairs
    cd = torch.cdist(torch.from_numpy(x), torch.from_numpy(x))
    index = faiss.IndexFlatL2(d)
    index.add(x)
    dist_f, nbr_f = index.search(x, 2)  # FAISS's GEMM path (many queries), squared distances
    for plain in ({p: float(cd[p]) for p in planted},
                  {(a, b): math.sqrt(max(float(dist_f[a, 1]), 0.0)) if nbr_f[a, 1] == b else math.inf
                   for a, b in planted}):
        assert max(abs(plain[p] - planted[p]) for p in planted) > 1e-3
        assert {p for p in planted if plain[p] < 1e-6} != {(10, 1500), (700, 1999)}


def test_error_bound_constant_matches_the_derivation():
    u = 2.0 ** -24
    c = screening_constant(576)
    assert c == pytest.approx((579 * u / (1 - 579 * u) + 2 * (u + 2.0 ** -52)) * (1 + 2.0 ** -10), rel=1e-15)
    assert screening_constant(576, "tf32x3") > 3 * c  # tensor cores: 2u per step and 2(d+5) steps
    e = pair_bound(c, underflow_term(576), 800.0, 800.0)
    # d=576, norms 800: (d + 3) u (800 + 800)^2 ~ 88 in squared distance, so a true L2 of 1e-6
    # is indistinguishable from ~9.4 (DESIGN-NOTES section 2 says 0.09: it drops a factor 1000)
    assert 85.0 < e < 92.0


def test_bound_holds_against_fp32_gemm_on_hard_rows():
    """|s^ - D| <= E for every pair of rows built to make fp32 cancellation bad."""
    x = torch.from_numpy(massive_rows(300, 64, seed=3))
    mu = x.double().mean(0)
    left, norm2 = blocks.augment(x, mu)
    s = left @ blocks.right_operand(left, 64).T
    exact = torch.cdist(x.double(), x.double()) ** 2
    norms = norm2.sqrt()
    bound = screening_constant(64) * (norms[:, None] + norms[None, :]) ** 2
    err = (s.double() - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 1e-3 * bound.max()  # the bound is not vacuous: fp32 really errs near it


# ---------------------------------------------------------------------------- property tests


def grid_rows(draw_n, draw_d):
    return arrays(np.float32, st.tuples(draw_n, draw_d), elements=st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=grid_rows(st.integers(0, 40), st.integers(1, 6)), threshold=st.sampled_from([0.0, 0.5, 0.75, 1.6]),
       block_rows=st.integers(1, 9), engine=st.sampled_from(ENGINES))
def test_grid_data_with_ties_and_duplicates_matches_brute_force(x, threshold, block_rows, engine):
    res = min_pairwise(x, threshold, engine, block_rows=block_rows, k=1, max_k=2)
    assert_matches_brute(res, x, threshold)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 60), d=st.integers(1, 12), clusters=st.integers(1, 4),
       spread=st.sampled_from([1e-8, 1e-4, 1.0]), offset=st.sampled_from([0.0, 1e3]),
       dtype=st.sampled_from([np.float32, np.float64]), engine=st.sampled_from(ENGINES))
def test_clustered_random_data_matches_brute_force(seed, n, d, clusters, spread, offset, dtype, engine):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) + offset
    x = (centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))).astype(dtype)
    threshold = float(np.quantile(rng.uniform(0, 3 * spread, 5), 0.5))
    res = min_pairwise(x, threshold, engine, block_rows=int(rng.integers(1, 20)), k=2, max_k=4)
    assert_matches_brute(res, x, threshold)


def test_diagonal_panels_cover_the_upper_triangle_exactly(monkeypatch):
    monkeypatch.setattr(symmetric, "CPU_PANEL", 3)  # several panels per diagonal block
    rng = np.random.default_rng(5)
    x = rng.standard_normal((57, 4)).astype(np.float32)
    x[[7, 30, 56]] = x[2]
    x[40] = x[41] + np.float32(1e-3)
    res = min_pairwise(x, 0.01, "torch", block_rows=16)
    assert_matches_brute(res, x, 0.01)
    best, _, _, nn = brute(x, 0.0)
    np.testing.assert_allclose(res.nn_distance, nn, rtol=1e-12)  # well separated: the screened nn is the nn


# ---------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("engine", ENGINES)
def test_group_of_300_identical_rows_lists_every_pair(engine):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    same = rng.choice(1000, 300, replace=False)
    x[same] = x[same[0]]
    res = min_pairwise(x, 1e-6, engine, block_rows=256)
    assert res.certified and res.distance == 0.0
    assert res.n_collisions == 44850 == len(res.collisions)
    s = np.sort(same)
    assert {(i, j) for i, j, _ in res.collisions.tolist()} == {(int(a), int(b)) for k, a in enumerate(s)
                                                                for b in s[k + 1:]}
    assert all(dist == 0.0 for _, _, dist in res.collisions.tolist())
    assert res.pair == (int(s[0]), int(s[1]))  # smallest pair among the ties
    assert (res.nn_distance[same] == 0.0).all() and (res.nn_distance[np.setdiff1d(np.arange(1000), same)] > 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_nan_and_inf_rows_are_excluded_and_listed(engine):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 5))
    x[[3, 17]] = x[9]  # equal to each other and to row 9: a collision only if they were compared
    x[3, 0], x[17, 4], x[30] = np.nan, np.inf, -np.inf
    res = min_pairwise(x, 1e-6, engine, block_rows=8)
    assert res.invalid_rows == [3, 17, 30]
    assert res.n_pairs == 47 * 46 // 2 and res.n_collisions == 0
    assert_matches_brute(res, x, 1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_inputs(engine, n):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    res = min_pairwise(x, 1e-6, engine)
    assert res.certified and res.n_pairs == n * (n - 1) // 2
    if n < 2:
        assert res.distance == math.inf and res.pair is None and res.collisions.tolist() == []
        assert (res.nn_distance == np.inf).all() and len(res.nn_distance) == n
    else:
        assert res.pair == (0, 1) and res.distance == pytest.approx(math.sqrt(27.0), rel=1e-15)


@pytest.mark.parametrize("engine", ENGINES)
def test_d_equal_one(engine):
    x = np.array([[5.0], [1.0], [3.5], [1.0 + 2 ** -20], [9.0]], np.float32)
    res = min_pairwise(x, 1e-3, engine, block_rows=2)
    assert res.pair == (1, 3) and res.distance == 2 ** -20
    assert res.collisions.tolist() == [(1, 3, 2 ** -20)]


def test_tiny_budget_gives_an_honest_uncertified_result():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    x[50:60] = x[5]  # 55 pairs at distance 0 need 55 re-ranks
    res = min_pairwise(x, 1e-6, "torch", block_rows=64, max_candidates=3)
    assert not res.certified
    assert "max_candidates=3" in res.uncertified_reason and "raise search.max_candidates" in res.uncertified_reason
    assert res.n_collisions < 55
    full = min_pairwise(x, 1e-6, "torch", block_rows=64)
    assert full.certified and full.n_collisions == 55


def test_faiss_tiny_k_widens_then_computes_rows_directly(caplog):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    x[:60] = x[0] + rng.integers(1, 50, size=(60, 8)) * np.float32(1e-6)  # 60 distinct rows, all pairs < 1e-4
    x[399] = x[0]
    with caplog.at_level("INFO", logger="collide.search.faiss_engine"):
        res = min_pairwise(x, 1e-4, "faiss", k=1, max_k=2, block_rows=64)
    assert "still uncertified at k=2: screening them against all rows" in caplog.text
    assert_matches_brute(res, x, 1e-4)
    tight = min_pairwise(x, 1e-4, "faiss", k=1, max_k=2, block_rows=64, max_candidates=100)
    assert not tight.certified and "max_candidates=100" in tight.uncertified_reason


def test_engines_agree_on_llm_like_rows():
    x = massive_rows(1500, 96, seed=8)
    x[1200] = x[17]
    x[800, 50] = x[801, 50] = 0
    x[801] = x[800]
    x[801, 50] = np.float32(3e-7)
    a = min_pairwise(x, 1e-6, "torch", block_rows=400)
    b = min_pairwise(x, 1e-6, "faiss", block_rows=400)
    assert a.certified and b.certified
    assert (a.distance, a.pair, a.collisions) == (b.distance, b.pair, b.collisions)
    assert a.collisions.tolist() == [(17, 1200, 0.0), (800, 801, float(np.float32(3e-7)))]


def test_tensor_input_float64_and_threads():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((120, 6))
    x[100] = x[20] + 1e-9
    res = min_pairwise(torch.from_numpy(x), 1e-6, "torch", block_rows=32, threads=1)
    assert_matches_brute(res, x, 1e-6)
    assert res.collisions.tolist()[0][:2] == (20, 100)


def test_progress_bar_counts_every_pair(capsys):
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    res = min_pairwise(x, 0.0, "torch", block_rows=64, progress=True)
    assert res.certified
    err = capsys.readouterr().err  # tqdm's total: C(300, 2) = 44850 pairs, all of them done
    assert "100%" in err and "44.9k/44.9k" in err and "pair/s" in err


def test_bad_arguments_are_one_line_errors():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(CollideError, match="search.backend='annoy'"):
        min_pairwise(x, backend="annoy")
    with pytest.raises(CollideError, match="tf32x3 runs on CUDA"):
        min_pairwise(x, precision="tf32x3", device="cpu")
    with pytest.raises(CollideError, match="fp16, bf16, fp32 or fp64"):
        min_pairwise(np.zeros((4, 2), np.int64))
    with pytest.raises(CollideError, match=r"2-D \(n, d\)"):
        min_pairwise(np.zeros(4, np.float32))
    with pytest.raises(CollideError, match="too large for fp32"):
        min_pairwise(np.array([[1e30], [0.0]], np.float64))
    assert pick_backend("auto", "cpu") == "torch"
