"""The torch engine on CUDA, fp32 (TF32 off) and tf32x3: skipped without a GPU.

Needs only numpy, torch and pytest (GPU machines may have nothing else). Checks the error bound
of both screening arithmetics on the GPU GEMMs, exact answers against an fp64 brute force, and
agreement with the CPU engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import collide.search.blocks as blocks
import collide.search.symmetric as symmetric
from collide.search import min_pairwise
from collide.search.api import numerics
from collide.search.bounds import screening_constant
from benchmarks.gpu_bound_check import worst_error_ratio

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PRECISIONS = ("fp32", "tf32x3")


def massive_rows(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * 60.0
    x[:, :4] += rng.uniform(300, 1500, size=4)
    x *= rng.uniform(1.0, 3.0, size=(n, 1))
    return x.astype(np.float32)


def brute(x: np.ndarray, threshold: float):
    xr = torch.from_numpy(np.asarray(x, np.float64))
    dist = torch.cdist(xr, xr, compute_mode="donot_use_mm_for_euclid_dist").numpy()
    iu, ju = np.triu_indices(len(x), 1)
    pairs = dist[iu, ju]
    return float(pairs.min()), {(int(i), int(j)) for i, j, v in zip(iu, ju, pairs) if v < threshold}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bound_holds_on_the_gpu_gemm(precision):
    x = torch.from_numpy(massive_rows(3000, 256, 1)).cuda()
    left, norm2 = blocks.augment(x, x.double().mean(0))
    state = symmetric.PairSearch(3000, 256, x.device, 1e-6, precision)
    with numerics(x.device, precision, 0):
        s = state._gemm(left, blocks.right_operand(left, 256)).double()
    exact = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    norms = norm2.sqrt()
    ratio = ((s - exact).abs() / (screening_constant(256, precision) * (norms[:, None] + norms[None, :]) ** 2)).max()
    assert 1e-4 < float(ratio) <= 1.0  # holds, and not vacuously


@pytest.mark.parametrize("precision", PRECISIONS)
def test_planted_pairs_and_random_problems_are_exact(precision):
    x = massive_rows(2000, 128, 0)
    for (a, b), delta in zip(((10, 1500), (700, 1999), (3, 4)), (1e-7, 5e-7, 2e-6)):
        x[b] = x[a]
        x[a, 100], x[b, 100] = 0.0, np.float32(delta)
    res = min_pairwise(torch.from_numpy(x).cuda(), 1e-6, "torch", precision=precision, block_rows=512)
    assert res.certified and res.pair == (10, 1500)
    assert [(i, j) for i, j, _ in res.collisions.tolist()] == [(10, 1500), (700, 1999)]
    assert res.collisions.distance[1] == pytest.approx(float(np.float32(5e-7)), rel=1e-12)
    rng = np.random.default_rng(7)
    for _ in range(8):
        n, d = int(rng.integers(2, 300)), int(rng.choice([1, 7, 64]))
        centers = rng.standard_normal((3, d)) * 10 + rng.choice([0.0, 1e3])
        x = (centers[rng.integers(0, 3, n)] + rng.choice([1e-6, 1e-3]) * rng.standard_normal((n, d))).astype(np.float32)
        t = float(rng.choice([1e-6, 1e-3]))
        res = min_pairwise(torch.from_numpy(x).cuda(), t, "torch", precision=precision,
                           block_rows=int(rng.integers(1, 64)))
        best, coll = brute(x, t)
        assert res.certified
        assert res.distance == pytest.approx(best, rel=1e-12, abs=1e-300)
        assert {(i, j) for i, j, _ in res.collisions.tolist()} == coll


def test_gpu_precisions_and_cpu_agree_on_wide_rows():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(12000, 2048, generator=g, device="cuda")
    x[:, :4] += 1000.0
    x[11999] = x[3]
    x[3, 10], x[11999, 10] = 0.0, 1e-7
    got = [min_pairwise(x, 1e-6, precision=p, block_rows=4096) for p in PRECISIONS]
    got.append(min_pairwise(x.cpu(), 1e-6, device="cpu", block_rows=4096))
    assert all(r.certified for r in got)
    assert len({(r.distance, r.pair, tuple(r.collisions.tolist())) for r in got}) == 1
    assert got[0].pair == (3, 11999) and math.isclose(got[0].distance, float(np.float32(1e-7)), rel_tol=1e-12)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_identical_rows_and_budget(precision):
    x = np.random.default_rng(1).standard_normal((1000, 16)).astype(np.float32)
    same = np.random.default_rng(2).choice(1000, 300, replace=False)
    x[same] = x[same[0]]
    res = min_pairwise(torch.from_numpy(x).cuda(), 1e-6, precision=precision, block_rows=256)
    assert res.certified and res.n_collisions == 44850 and res.distance == 0.0
    res = min_pairwise(torch.from_numpy(x).cuda(), 1e-6, precision=precision, block_rows=256, max_candidates=10)
    assert not res.certified and "max_candidates=10" in res.uncertified_reason


@pytest.mark.parametrize("precision", PRECISIONS)
def test_worst_observed_error_is_at_most_half_the_bound(precision):
    """The error bound on adversarial rows (massive dimensions, near-cancelling sums, mixed exponents),
    d up to 8192. For tf32x3 this tests the assumption on tensor-core accumulation (bounds.py)."""
    r = worst_error_ratio("cuda", precision)
    assert r["passed"] and 0.0 < r["worst_ratio"] <= 0.5, r
    assert len(r["ratios"]) == 15 and "cancel_d8192" in r["ratios"]
