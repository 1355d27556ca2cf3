"""search.nearest: every row's nearest neighbour, none, or (auto, pruned, above the cut-off) a seeded sample's,
each exact: distance and neighbour equal to an fp64 brute force, ties to the smallest row."""

from __future__ import annotations

import numpy as np
import pytest

from collide.config import SearchConfig
from collide.errors import CollideError
from collide.search import min_pairwise, search_store
from collide.search import nearest as nearest_mod, prune as prune_mod
from collide.search.nearest import nearest_mode, sample_rows


def brute(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each row's exact nn L2 distance, its nn's row: the smallest among exact ties)."""
    x = np.asarray(x, np.float64)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    at = d2.argmin(1)
    return np.sqrt(d2[np.arange(len(x)), at]), at


def states(n: int = 700, d: int = 24, seed: int = 0) -> np.ndarray:
    """Low-rank rows with two massive dimensions, a pair about 5e-7 apart (17, 41) and three equal rows
    (200, n // 2, n - 100)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) + 0.05 * rng.standard_normal((n, d))
    x[:, :2] += 400.0
    x = x.astype(np.float32)
    x[17, -1] = 0.25
    x[41] = x[17]
    x[41, -1] += np.float32(5e-7)  # 0.25 + 5e-7 in fp32: a pair about 5e-7 apart
    x[[n // 2, n - 100]] = x[200]
    return x


class Layer:
    """A store of one layer held as an array (search_store's interface)."""

    def __init__(self, x: np.ndarray):
        self.x, self.d, self.n_rows = x, x.shape[1], len(x)

    def iter_blocks(self, layer, rows):
        for s in range(0, self.n_rows, rows):
            yield np.arange(s, min(s + rows, self.n_rows), dtype=np.int64) + 1000, self.x[s:s + rows].copy()


def check_sample(res, x, size):
    want, at = brute(x)
    rows = np.flatnonzero(res.nn_index >= 0)
    assert res.nearest == {"rows": "sample", "n_rows": size, "seed": 0,
                           "description": f"nn of {size:,} sampled rows, each exact"}
    assert rows.tolist() == sample_rows(len(x), size).tolist()  # the seeded sample, nothing else
    np.testing.assert_array_equal(res.nn_distance[rows], want[rows])  # bit for bit
    np.testing.assert_array_equal(res.nn_index[rows], at[rows])
    assert np.isnan(np.delete(res.nn_distance, rows)).all()


@pytest.mark.parametrize("block_rows, panel", [(64, 32), (4096, 1024)])
def test_auto_above_the_cutoff_certifies_a_sample_and_the_same_minimum(block_rows, panel, monkeypatch):
    monkeypatch.setattr(nearest_mod, "QUERY_PANEL", panel)  # several query panels per block, or one
    x = states()
    full = min_pairwise(x, 1e-6, prune="off", nearest=True, block_rows=block_rows)
    res = min_pairwise(x, 1e-6, prune="pca", nearest="auto", nearest_cutoff=500, nearest_sample=90,
                       block_rows=block_rows)
    assert res.certified and res.prune["method"] == "pca"
    assert (res.distance, res.pair, res.collisions) == (full.distance, full.pair, full.collisions)
    assert res.pair == (200, 350) and res.n_collisions == 4  # the three equal rows and the planted pair
    assert (17, 41) in set(zip(res.collisions.a.tolist(), res.collisions.b.tolist()))
    check_sample(res, x, 90)
    want, at = brute(x)
    np.testing.assert_array_equal(full.nn_index, at)
    assert full.nn_index[[200, 350, 600]].tolist() == [350, 200, 200]  # ties: the smallest other row


def test_auto_gives_every_row_below_the_cutoff_or_without_pruning():
    x = states(300)
    want, at = brute(x)
    for kw in (dict(prune="pca", nearest_cutoff=300), dict(prune="off", nearest_cutoff=10)):
        res = min_pairwise(x, 1e-6, nearest="auto", nearest_sample=20, **kw)
        assert res.nearest["rows"] == "all" and res.nearest["n_rows"] == 300
        np.testing.assert_array_equal(res.nn_distance, want)
        np.testing.assert_array_equal(res.nn_index, at)
    off = min_pairwise(x, 1e-6, nearest=False)
    assert off.nearest["rows"] == "none" and (off.nn_index == -1).all() and np.isnan(off.nn_distance).all()


def test_search_store_auto_prunes_and_samples_by_prompt_id(monkeypatch):
    monkeypatch.setattr(prune_mod, "AUTO_MIN_ROWS", 256)
    monkeypatch.setattr(prune_mod, "TILE_ROWS", {"cpu": 32, "cuda": 32})
    x = states(600, seed=3)
    cfg = SearchConfig(progress=False, block_rows=128, nearest_cutoff=400, nearest_sample=64)
    lr = search_store(Layer(x), 5, 1e-6, cfg)
    assert lr.result.prune["method"] == "pca"
    check_sample(lr.result, x, 64)
    entry = lr.to_dict(max_listed=5)
    assert entry["nearest"]["rows"] == "sample" and entry["closest_pair"] == [1200, 1300]
    sampled = lr.result.nn_distance[np.isfinite(lr.result.nn_distance)]
    assert entry["nn_distance"]["p50"] == pytest.approx(np.percentile(sampled, 50))
    brute_force = search_store(Layer(x), 5, 1e-6, SearchConfig(progress=False, block_rows=128, prune="off"))
    assert brute_force.result.nearest["rows"] == "all" and brute_force.result.prune is None
    assert brute_force.result.collisions == lr.result.collisions


def test_sampled_nearest_under_a_tiny_budget_is_reported_uncertified():
    x = states(400)
    res = min_pairwise(x, 1e-6, prune="pca", nearest="auto", nearest_cutoff=100, nearest_sample=50,
                       max_candidates=60)
    assert not res.certified and "max_candidates" in res.uncertified_reason


@pytest.mark.parametrize("value, mode", [("auto", "auto"), (True, "all"), ("true", "all"), (False, "none"),
                                         ("False", "none")])
def test_nearest_values(value, mode):
    assert nearest_mode(value) == mode


def test_nearest_bad_values_fail_in_one_line(compose):
    with pytest.raises(CollideError, match="search.nearest='sometimes'"):
        nearest_mode("sometimes")
    with pytest.raises(CollideError, match="search.nearest='sometimes' is not one of auto, true, false"):
        compose(["search.nearest=sometimes"])
    assert compose(["search.nearest=true"]).search.nearest is True
    assert compose(["search.nearest=false"]).search.nearest is False
    assert compose().search.nearest == "auto"
    with pytest.raises(CollideError, match="nearest_sample=0"):
        min_pairwise(states(300), nearest_sample=0)


def test_row_norms_and_centred_norms_are_the_same_on_every_path(monkeypatch):
    """Every engine reports each row's norm and its norm about the fp64 mean (as the screen sees the row)."""
    x = states(500, seed=4)
    x[7, 3] = np.nan  # an invalid row: nan in both
    valid = np.isfinite(x).all(1)
    mu = x[valid].astype(np.float64).sum(0) / valid.sum()
    a = (x[valid].astype(np.float64) - mu).astype(np.float32)
    want = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))
    got = [min_pairwise(x, 1e-6, engine, prune=prune, nearest="auto", nearest_cutoff=100, block_rows=128)
           for engine, prune in (("torch", "off"), ("torch", "pca"), ("faiss", "off"))]
    got.append(search_store(Layer(x), 0, 1e-6, SearchConfig(progress=False, block_rows=128, prune="off")).result)
    for r in got:
        assert np.isnan(r.centred_norm[7]) and np.isnan(r.row_norm[7])
        np.testing.assert_allclose(r.centred_norm[valid], want, rtol=1e-15)
        np.testing.assert_array_equal(r.centred_norm, got[0].centred_norm)
        np.testing.assert_allclose(r.row_norm[valid], np.linalg.norm(x[valid].astype(np.float64), axis=1), rtol=1e-14)
