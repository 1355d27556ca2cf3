"""The benchmark suite's exactness facts, its modules at the tiny size, the gate's baseline and gpu_check on CPU.

Speed is never asserted here (benchmarks/ measures it as ratios); these tests fail on a wrong value
on the first run, which a comparison against history cannot.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed: import it as the namespace package `benchmarks`

from benchmarks import gate  # noqa: E402
from benchmarks.suite.bench_search import D, llm_like, planted_problem  # noqa: E402
from benchmarks.suite.common import SkipNotImplemented  # noqa: E402

SUITE = sorted(m.name for m in pkgutil.iter_modules([str(REPO / "benchmarks" / "suite")]) if m.name.startswith("bench_"))


def test_seeded_problem_has_the_recorded_certified_minimum():
    from collide.search import min_pairwise

    res = min_pairwise(llm_like(800, D, seed=1), 1e-6)
    assert res.certified
    assert res.pair == (127, 768)
    # fp64 exact distance (scipy pdist in fp64 gives 279.1404698263589: same to 1e-15)
    assert res.distance == pytest.approx(279.1404698263586, rel=1e-12)
    assert res.collisions.tolist() == []


def test_planted_collisions_are_found_and_nothing_else():
    from collide.search import min_pairwise

    x, planted = planted_problem(1500)
    res = min_pairwise(x, 1e-6)
    assert res.certified
    expected = sorted((a, b, dist) for (a, b), dist in planted.items() if dist < 1e-6)
    assert [(a, b) for a, b, _ in res.collisions.tolist()] == [(a, b) for a, b, _ in expected]
    assert [dist for *_, dist in res.collisions.tolist()] == [dist for *_, dist in expected]  # exact: one float32 apart
    assert (res.distance, res.pair) == (float(np.float32(1e-7)), (11, 1499))


def _benchmarks_of(module):
    """(label, setup_cache or None, [track callables taking the cache]) per class or module-level track_*."""
    found = []
    for name, obj in vars(module).items():
        if isinstance(obj, type) and obj.__module__ == module.__name__:
            tracks = [getattr(obj, a) for a in dir(obj) if a.startswith("track_")]
            if tracks:
                instance = obj()
                found.append((name, getattr(instance, "setup_cache", None),
                              [getattr(instance, t.__name__) for t in tracks]))
        elif name.startswith("track_") and callable(obj):
            found.append((name, None, [obj]))
    return found


@pytest.mark.parametrize("name", SUITE)
def test_suite_module_tracks_run_at_the_tiny_size(name, monkeypatch):
    monkeypatch.setenv("COLLIDE_BENCH_SIZE", "tiny")
    module = importlib.import_module(f"benchmarks.suite.{name}")
    benchmarks = _benchmarks_of(module)
    assert benchmarks, f"{name} has no track_* benchmark"
    measured = 0
    for label, setup_cache, tracks in benchmarks:
        assert getattr(module, "unit", None) == "ratio" or all(
            getattr(t, "unit", getattr(getattr(t, "__self__", None), "unit", None)) == "ratio" for t in tracks), label
        cache = setup_cache() if setup_cache else None
        for track in tracks:
            try:
                value = track(cache) if setup_cache else track()
            except SkipNotImplemented:
                continue
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (label, track.__name__, value)
            measured += 1
    assert measured, f"every track_* of {name} skipped at the tiny size"


def test_gate_compares_with_the_nearest_recorded_ancestor():
    commits = gate.git("rev-list", "--first-parent", "HEAD").splitlines()
    head, older = commits[0], commits[2]
    assert gate.baseline_commit(head, {older, commits[5], head}) == older
    assert gate.baseline_commit(head, {head}) is None
    assert gate.baseline_commit(commits[1], {head, commits[4]}) == commits[4]  # a descendant is never a baseline
