"""The pruned search (collide/search/prune.py) gives the brute-force engine's answers, and its bound holds.

Exactness: the minimum, its pair, the collision list, every nn distance and ``certified`` are
compared bit for bit with ``prune="off"`` on random, clustered, duplicated and adversarial rows,
with tiles small enough that tile skipping and partial tiles are exercised. The bound: exact
rational distances against the fp64 projection and the fp32 screen of the projected rows.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from collide.config import SearchConfig
from collide.errors import CollideError
from collide.search import min_pairwise, search_store
from collide.search import projection, prune as prune_mod
from collide.search.bounds import ETA64, pair_bound, prune_threshold
from collide.search.symmetric import PairSearch
from collide.search.tiles import as_threshold


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 16 rows: skipped tiles, partial tiles and many tile pairs at test sizes."""
    monkeypatch.setattr(prune_mod, "TILE_ROWS", {"cpu": 16, "cuda": 16})


def same(a, b) -> None:
    assert (a.distance, a.pair, a.certified, a.n_collisions) == (b.distance, b.pair, b.certified, b.n_collisions)
    assert a.collisions == b.collisions
    assert np.array_equal(a.nn_distance, b.nn_distance, equal_nan=True)
    assert np.array_equal(a.nn_index, b.nn_index) and a.nearest == b.nearest
    assert a.invalid_rows == b.invalid_rows


def both(x, threshold=1e-6, nearest=True, **kw):
    a = min_pairwise(x, threshold, "torch", prune="off", nearest=nearest, **kw)
    b = min_pairwise(x, threshold, "torch", prune="pca", nearest=nearest, **kw)
    same(a, b)
    assert a.prune is None and b.prune["method"] == "pca"
    return a, b


def low_rank(n, d, rank, seed, noise=0.05):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rank)) @ (rng.standard_normal((rank, d)) * np.linspace(3, 0.1, rank)[:, None])
    x += noise * rng.standard_normal((n, d))
    x[:, :2] += 300.0  # massive dimensions
    return x.astype(np.float32)


def clustered(n, d, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, d)).astype(np.float32) * 10
    return (centres[rng.integers(0, 12, n)] + 0.01 * rng.standard_normal((n, d))).astype(np.float32)


def duplicated(n, d, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n // 5, d)).astype(np.float32)
    return base[rng.integers(0, len(base), n)]


def equal_residuals(n, d, seed):
    """Rows with one shared large component and the rest on a sphere: residual norms all equal."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, d - 1))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return np.concatenate([rng.integers(0, 3, (n, 1)) * 1000.0, y], 1).astype(np.float64)


def planted(n, d, seed):
    x = low_rank(n, d, 8, seed)
    for k, delta in enumerate((1e-7, 5e-7, 3e-7)):
        a, b = 3 + 11 * k, n - 1 - 7 * k
        x[b] = x[a]
        x[b, 5] = np.nextafter(x[a, 5], np.float32(np.inf)) if k == 2 else x[a, 5] + np.float32(delta)
    return x


CASES = {
    "random": lambda: np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32),
    "low_rank": lambda: low_rank(500, 96, 10, 1),
    "clustered": lambda: clustered(400, 40, 2),
    "duplicated": lambda: duplicated(250, 30, 3),
    "equal_residuals": lambda: equal_residuals(240, 20, 4),
    "k_at_least_d": lambda: low_rank(300, 12, 4, 5),
    "n_below_k": lambda: low_rank(40, 200, 6, 6),
    "planted": lambda: planted(600, 64, 7),
}


@pytest.mark.parametrize("nearest", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pruned_equals_brute_force(case, nearest):
    x = CASES[case]()
    a, b = both(x, nearest=nearest)
    assert a.certified
    if case == "planted":
        assert a.n_collisions >= 2 and a.distance < 1e-6
    if case == "k_at_least_d":
        assert b.prune["k"] == 12
    if case == "n_below_k":
        assert b.prune["k"] <= 40


@pytest.mark.parametrize("nearest", [True, False])
@pytest.mark.parametrize("case", ["low_rank", "duplicated", "planted"])
def test_the_torch_tile_code_of_cuda_agrees_too(monkeypatch, case, nearest):
    """The per-tile code that runs on CUDA (torch ops instead of numpy), exercised on CPU."""
    monkeypatch.setattr(prune_mod, "NUMPY_ON_CPU", False)
    both(CASES[case](), nearest=nearest)


@pytest.mark.parametrize("nearest", [True, False])
def test_many_collisions_under_a_large_threshold(nearest):
    x = clustered(300, 16, 8)
    a, _ = both(x, threshold=0.05, nearest=nearest)
    assert a.n_collisions > 100


def test_low_rank_data_skips_most_pairs():
    x = low_rank(2000, 64, 6, 9, noise=0.01)
    _, b = both(x, nearest=False)
    assert b.prune["pairs_evaluated_fraction"] < 0.05
    assert b.prune["tile_pairs_evaluated_fraction"] < 0.5


def test_nan_rows_tiny_inputs_and_budget():
    x = low_rank(200, 20, 4, 10)
    x[[3, 50]] = np.nan
    both(x)
    for n in (0, 1, 2, 3):
        both(low_rank(n, 5, 2, 11) if n else np.zeros((0, 5), np.float32))
    x = duplicated(200, 10, 12)  # a tiny budget: each result is certified only if it is exact
    full = min_pairwise(x, 1e-6, "torch", prune="off")
    for mode in ("off", "pca"):
        r = min_pairwise(x, 1e-6, "torch", prune=mode, max_candidates=5)
        if r.certified:
            same(r, full)
        else:
            assert "max_candidates" in r.uncertified_reason


def test_auto_rule_and_modes():
    x = low_rank(100, 8, 3, 13)
    res = min_pairwise(x, 1e-6, "torch")  # auto, too few rows: brute force, recorded
    assert res.prune["method"] == "off" and "nearest" in res.prune["reason"]
    res = min_pairwise(x, 1e-6, "torch", nearest=False)
    assert res.prune["method"] == "off" and "8192" in res.prune["reason"]
    with pytest.raises(CollideError, match="search.prune"):
        min_pairwise(x, 1e-6, "torch", prune="fast")
    assert prune_mod.choose("auto", 10**6, torch.device("cpu"), all_nearest=False) == (True, None)
    assert prune_mod.choose("auto", 10**6, torch.device("cpu"), all_nearest=True)[0] is False


class Streamed:
    """A store that only streams (reading a layer whole fails)."""

    def __init__(self, states):
        self.states, self.d, self.n_rows = states, states.shape[1], len(states)

    def layer(self, k):
        raise AssertionError("not loaded whole")

    def iter_blocks(self, k, rows):
        for s in range(0, self.n_rows, rows):
            yield np.arange(s, min(s + rows, self.n_rows)) + 1000, self.states[s:s + rows].copy()


@pytest.mark.parametrize("fits", [True, False])
def test_store_layers_prune_in_memory_or_fall_back_to_streaming(monkeypatch, fits):
    x = planted(300, 32, 14)
    x[7] = np.inf
    monkeypatch.setattr(prune_mod, "fits_in_memory", lambda m, d: fits)
    monkeypatch.setattr("collide.search.api.fits_in_memory", lambda m, d: fits)
    off = search_store(Streamed(x), 7, 1e-6, SearchConfig(block_rows=64, progress=False, prune="off"))
    on = search_store(Streamed(x), 7, 1e-6, SearchConfig(block_rows=64, progress=False, prune="pca"))
    same(off.result, on.result)
    assert off.to_dict(10)["prune"] is None
    record = on.to_dict(10)["prune"]
    assert record["method"] == ("pca" if fits else "off")
    if not fits:
        assert "streamed" in record["reason"]
    assert on.to_dict(10)["closest_pair"] == off.to_dict(10)["closest_pair"]


# ------------------------------------------------------------------ the bound itself
def exact_sq(a: np.ndarray, b: np.ndarray) -> Fraction:
    return sum((Fraction(float(p)) - Fraction(float(q))) ** 2 for p, q in zip(a, b))


def check_bound(x: np.ndarray, k: int) -> None:
    """Every pair, at each projection level j: the projected distance exceeds the exact one by at most
    delta_xy, the fp32 screen of the projection never prunes a pair at B = D, and every tile pair's
    bound is below its pairs' distances."""
    xt = torch.from_numpy(x)
    mu = xt.to(torch.float64).mean(0)
    basis = projection.pca_basis(xt.to(torch.float64) - mu, min(k, x.shape[1], len(x)))
    z, w_norm, n2 = projection.project(xt, mu, basis)
    n = len(x)
    exact = {(i, j): exact_sq(x[i], x[j]) for i in range(n) for j in range(i + 1, n)}
    kk = basis.shape[1]
    for level in sorted({1, kk}):
        lev = prune_mod.PrunedSearch._level(z, n2, level, x.shape[1], np.array([0, n]), "fp32")
        resid = (n2 - z[:, :level].square().sum(1)).clamp(min=0).sqrt()[:, None]
        zj = z if level == kk else torch.cat([z[:, :level], resid], 1)
        s = (lev["lz"] @ lev["rz"].T).numpy()
        for (i, j), d2 in exact.items():
            delta = lev["coef"] * (float(w_norm[i]) + float(w_norm[j])) + 2 * ETA64
            proj = math.sqrt(float(((zj[i] - zj[j]) ** 2).sum()))
            lower = proj * (1 - 1e-15) - delta
            assert lower <= 0 or Fraction(lower) ** 2 <= d2, (level, i, j)
            e_z = pair_bound(lev["c"], lev["eta"], lev["nzmax"][0], lev["nzmax"][0])
            b = math.nextafter(float(d2), math.inf)
            thr = float(as_threshold(torch.tensor([prune_threshold(b, delta, e_z)], dtype=torch.float64))[0])
            assert s[i, j] <= thr and s[j, i] <= thr, (level, i, j)
    state = PairSearch(n, x.shape[1], torch.device("cpu"), 1e-6)
    ps = prune_mod.PrunedSearch(xt, torch.arange(n), mu, state, k=k, tile=2)
    pos = ps.perm.numpy()
    for a in range(len(ps.off) - 1):
        for c in range(a, len(ps.off) - 1):
            rows_a, rows_c = pos[ps.off[a]:ps.off[a + 1]], pos[ps.off[c]:ps.off[c + 1]]
            pairs = [exact[min(i, j), max(i, j)] for i in rows_a for j in rows_c if i != j]
            if pairs and ps.tile_lb[a, c] > 0:
                assert Fraction(ps.tile_lb[a, c]) ** 2 <= min(pairs), (a, c)


@st.composite
def adversarial_rows(draw):
    n, d = draw(st.integers(2, 7)), draw(st.integers(1, 10))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e12]))
    vals = draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=n * d, max_size=n * d))
    x = np.array(vals, np.float32).reshape(n, d) * np.float32(scale)
    if draw(st.booleans()):  # a massive dimension
        x[:, 0] += np.float32(scale * 1e4)
    for i in range(1, n):  # near-duplicates: one-ulp moves of an earlier row
        if draw(st.booleans()):
            src = draw(st.integers(0, i - 1))
            x[i] = np.nextafter(x[src], np.float32(draw(st.sampled_from([-np.inf, np.inf]))))
            if draw(st.booleans()):
                x[i] = x[src]
    if draw(st.booleans()):  # equal residual norms: permuted copies of one row
        x[1:] = np.stack([np.random.default_rng(i).permutation(x[0]) for i in range(1, n)])
    return x, draw(st.sampled_from([1, 2, 4, 64]))


@settings(max_examples=150, deadline=None)
@given(adversarial_rows())
def test_the_bound_holds_under_adversarial_rounding(case):
    x, k = case
    check_bound(x, k)


@settings(max_examples=40, deadline=None)
@given(adversarial_rows())
def test_adversarial_rows_agree_with_brute_force(case):
    x, _ = case
    for nearest in (True, False):
        both(x, nearest=nearest, threshold=float(np.abs(x).max()) * 1e-7 + 1e-30)
