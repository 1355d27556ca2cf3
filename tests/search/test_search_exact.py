"""Exact everywhere: every reported distance is the exact fp64 value, with a correctly
rounded square root, on both engines, in memory and streamed from a store.

Ground truth: a brute force over all pairs in fp64 with numpy's IEEE sqrt (``brute_nn``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from collide.config import SearchConfig
from collide.errors import CollideError
from collide.search import min_pairwise, search_store
from benchmarks.gpu_bound_check import worst_error_ratio

pytest.importorskip("faiss")
ENGINES = ("torch", "faiss")


def brute_nn(x: np.ndarray) -> np.ndarray:
    """Each row's exact L2 distance to its nearest other row (fp64 squared sums, IEEE sqrt)."""
    return brute_nn_index(x)[0]


def brute_nn_index(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(brute_nn, the row of each row's nearest neighbour: the smallest among exact ties)."""
    x = np.asarray(x, np.float64)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    at = d2.argmin(1)  # numpy's argmin takes the first of equal values
    return np.sqrt(d2[np.arange(len(x)), at]), at


def near_ties(n_groups: int = 80, d: int = 48, seed: int = 0) -> np.ndarray:
    """Rows of norm ~5e4 (massive dimensions) in groups (c, s1, s2, t1, t2): s1 = c + 1000 u and
    s2 = c - 1000.01 u (|u| = 1, off the massive dimensions), t1 and t2 500 away from s1 and s2.
    c's two nearest neighbours are 1000 and 1000.01 away: their squared distances differ by 20,
    inside the fp32 screening error (actual errors ~300, the bound ~3e4: c's screened nearest
    neighbour is the wrong one half the time), far above the minimum (a planted pair at 0.5) plus
    that bound, and neither has c as its own nearest neighbour (t1, t2 are nearer), so that only a
    per-row certificate re-ranks both."""
    rng = np.random.default_rng(seed)

    def quiet_unit():
        u = rng.standard_normal(d)
        u[:3] = 0.0  # the massive dimensions stay equal within a group: fp32 holds the offsets to ~1e-5
        return u / np.linalg.norm(u)

    rows = []
    for _ in range(n_groups):
        c = rng.standard_normal(d) * 50.0
        c[:3] += 30000.0 * rng.uniform(0.5, 1.5, 3)
        u = quiet_unit()
        s1, s2 = c + 1000.0 * u, c - 1000.01 * u
        rows += [c, s1, s2, s1 + 500.0 * quiet_unit(), s2 + 500.0 * quiet_unit()]
    rows.append(rows[0] + 0.5 * quiet_unit())  # the minimum
    x = np.array(rows)[rng.permutation(len(rows))]
    return x.astype(np.float32)


class Streamed:
    """A store that only streams fp32 blocks (search_store's out-of-core path)."""

    def __init__(self, x: np.ndarray):
        self.x, self.d, self.n_rows = x, x.shape[1], len(x)

    def iter_blocks(self, layer, rows):
        for s in range(0, self.n_rows, rows):
            yield np.arange(s, min(s + rows, self.n_rows), dtype=np.int64) + 500, self.x[s:s + rows].copy()

    def layer(self, layer):
        return np.arange(self.n_rows, dtype=np.int64) + 500, self.x


# ---------------------------------------------------------------------------- 1. exact nn_distance


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("block_rows", [7, 37, 4096])
def test_nn_distance_is_exact_for_every_row_on_near_ties(engine, block_rows):
    x = near_ties()
    res = min_pairwise(x, 1e-6, engine, block_rows=block_rows, k=1, max_k=4)
    assert res.certified
    want, at = brute_nn_index(x)
    np.testing.assert_array_equal(res.nn_distance, want)  # bit for bit: same fp64 sums, same sqrt
    np.testing.assert_array_equal(res.nn_index, at)  # and the neighbour itself
    assert res.distance == want.min() and res.nearest["rows"] == "all"


@pytest.mark.parametrize("engine", ENGINES)
def test_nn_distance_is_exact_streamed_from_a_store(engine):
    x = near_ties(40, seed=1)
    lr = search_store(Streamed(x), 0, 1e-6, SearchConfig(backend=engine, block_rows=13, progress=False))
    want, at = brute_nn_index(x)
    np.testing.assert_array_equal(lr.result.nn_distance, want)
    np.testing.assert_array_equal(lr.result.nn_index, at)
    np.testing.assert_allclose(lr.result.row_norm, np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-15)
    assert lr.result.certified


@pytest.mark.parametrize("engine", ENGINES)
def test_nearest_off_gives_the_same_minimum_and_collisions_and_no_nn(engine):
    x = near_ties(30, seed=2)
    on, off = (min_pairwise(x, 1000.005, engine, block_rows=19, nearest=f) for f in (True, False))
    assert (on.distance, on.pair, on.collisions) == (off.distance, off.pair, off.collisions)
    want = brute_nn(x)
    assert on.n_collisions >= 90 and np.isnan(off.nn_distance).all()  # c-s1, s1-t1, s2-t2 of each group
    np.testing.assert_array_equal(on.nn_distance, want)


def test_to_dict_has_nn_percentiles_only_with_nearest():
    x = near_ties(20, seed=3)
    for nearest in (True, False):
        lr = search_store(Streamed(x), 4, 0.75, SearchConfig(block_rows=16, progress=False, nearest=nearest))
        e = lr.to_dict(max_listed=2)
        assert e["n_vectors"] == 101 and e["invalid_rows"] == [] and e["n_collisions"] == 1
        assert e["collisions"] == [{"a": 500 + lr.result.pair[0], "b": 500 + lr.result.pair[1],
                                    "distance": e["min_distance"]}]
        if nearest:
            assert e["nn_distance"]["min"] == e["min_distance"] == pytest.approx(0.5, rel=1e-5)
            assert e["nn_distance"]["max"] == pytest.approx(1000.0, rel=1e-5)  # the centres c
        else:
            assert e["nn_distance"] is None


# ---------------------------------------------------------------------------- 2. one correctly rounded sqrt


@pytest.mark.parametrize("engine", ENGINES)
def test_distances_use_a_correctly_rounded_sqrt_and_the_threshold_rule_on_it(engine):
    x = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])  # d2 = 2: torch's CPU sqrt(2.0) is 1 ulp low
    at = math.sqrt(2.0)
    for threshold, listed in ((at, False), (math.nextafter(at, 0.0), False), (math.nextafter(at, 3.0), True)):
        res = min_pairwise(x, threshold, engine)
        assert res.distance == at and res.nn_distance[0] == at and res.nn_distance[1] == at
        assert res.collisions.tolist() == ([(0, 1, at)] if listed else [])


@pytest.mark.parametrize("engine", ENGINES)
def test_every_reported_distance_is_math_sqrt_of_the_fp64_sum(engine):
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 4, size=(40, 3)).astype(np.float64)  # integer squared distances 0..108
    res = min_pairwise(x, 5.0, engine, block_rows=9)
    for i, j, dist in res.collisions.tolist():
        assert dist == math.sqrt(float(((x[i] - x[j]) ** 2).sum())) and dist < 5.0
    assert res.n_collisions == sum(math.sqrt(float(((x[i] - x[j]) ** 2).sum())) < 5.0
                                   for i in range(40) for j in range(i + 1, 40))
    np.testing.assert_array_equal(res.nn_distance, brute_nn(x))


# ---------------------------------------------------------------------------- 3. dtypes


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [">f8", "<f8", ">f4", ">f2", "<f2"])
def test_any_byte_order_and_width_is_taken_exactly(engine, dtype):
    step = {8: 2.0 ** -40, 4: 2.0 ** -20, 2: 2.0 ** -8}[np.dtype(dtype).itemsize]  # below fp32 for >f8
    x = np.array([[1.0, 3.0], [1.0 + step, 3.0], [7.0, 3.0]], dtype=dtype)
    res = min_pairwise(x, step / 2, engine)
    assert res.distance == step and res.pair == (0, 1) and res.n_collisions == 0 and res.certified


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_tensor_is_exact(engine):
    x = torch.tensor([[1.0, 2.0], [1.0078125, 2.0], [4.0, 4.0]], dtype=torch.bfloat16)  # 1 + 2^-7: one bf16 ulp
    res = min_pairwise(x, 0.01, engine)
    assert res.distance == 2.0 ** -7 and res.collisions.tolist() == [(0, 1, 2.0 ** -7)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad", [np.longdouble, np.complex128, object, np.uint16])
def test_dtypes_it_cannot_take_exactly_are_refused_in_one_line(engine, bad):
    if np.dtype(bad) == np.longdouble and np.finfo(np.longdouble).bits == 64:
        pytest.skip("long double is fp64 on this platform: taken exactly")
    x = np.ones((3, 2), dtype=bad)
    with pytest.raises(CollideError, match=rf"got dtype {np.dtype(bad)}; cast") as info:
        min_pairwise(x, 1e-6, engine)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- 4. tiny thresholds


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("threshold", [1e-170, 5e-324])
def test_tiny_threshold_still_lists_identical_rows(engine, threshold):
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1e-160], [9.0, 9.0]])
    res = min_pairwise(x, threshold, engine)
    assert res.collisions.tolist() == [(0, 1, 0.0)]  # 1e-160 away is not under 1e-170
    assert res.distance == 0.0 and res.certified


# ---------------------------------------------------------------------------- 5. degenerate input


@pytest.mark.parametrize("shape", [(0, 0), (1, 0), (5, 0)])
def test_zero_width_is_the_same_one_line_error_on_every_backend(shape):
    messages = set()
    for engine in ENGINES:
        with pytest.raises(CollideError, match="zero-width") as info:
            min_pairwise(np.zeros(shape, np.float32), 1e-6, engine)
        messages.add(str(info.value))
    assert len(messages) == 1 and "\n" not in messages.pop()


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_row_agree_across_backends(n):
    got = [min_pairwise(np.ones((n, 3), np.float32), 1e-6, engine) for engine in ENGINES]
    for r in got:
        assert (r.distance, r.pair, len(r.collisions), r.n_pairs, r.certified) == (math.inf, None, 0, 0, True)
        np.testing.assert_array_equal(r.nn_distance, np.full(n, np.inf))


# ---------------------------------------------------------------------------- 6. the bound, measured


def test_worst_error_ratio_on_cpu_fp32_is_under_half_and_not_vacuous():
    """The GPU check's measurement (benchmarks.gpu_bound_check), here on the CPU engine in fp32."""
    r = worst_error_ratio("cpu", "fp32", dims=(8, 64, 576), n=256)
    assert r["passed"] and 0.01 < r["worst_ratio"] <= 0.5, r
    assert set(r["ratios"]) == {f"{f}_d{d}" for f in ("massive", "cancel", "mixed") for d in (8, 64, 576)}
