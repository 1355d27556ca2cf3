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
from benchmarks.suite.common import run_tracks  # noqa: E402

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


@pytest.mark.slow  # about a minute in all (bench_exact_nn loads SmolLM2)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.ray) if n == "bench_ray" else n for n in SUITE])
def test_suite_module_tracks_run_at_the_tiny_size(name, monkeypatch):
    if name == "bench_ray":
        from tests.support.netns import namespace_problem

        if namespace_problem():  # Ray runs only inside a loopback-only network namespace here
            pytest.skip(namespace_problem())
    monkeypatch.setenv("COLLIDE_BENCH_SIZE", "tiny")
    module = importlib.import_module(f"benchmarks.suite.{name}")
    values = run_tracks(module)
    assert values, f"{name} has no track_* benchmark"
    measured = {k: v for k, v in values.items() if not isinstance(v, str)}
    assert measured, f"every track_* of {name} skipped at the tiny size: {values}"
    for key, value in measured.items():
        owner, _, track = key.rpartition(".")
        unit = getattr(getattr(getattr(module, owner), track) if owner else getattr(module, key), "unit",
                       getattr(getattr(module, owner), "unit", "ratio") if owner else "ratio")
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        assert value > 0 if unit == "ratio" else value >= 0, (key, unit, value)  # a cost ratio is never 0


def test_gate_compares_with_the_nearest_recorded_ancestor():
    commits = gate.git("rev-list", "--first-parent", "HEAD").splitlines()
    head, older = commits[0], commits[2]
    assert gate.baseline_commit(head, {older, commits[5], head}) == older
    assert gate.baseline_commit(head, {head}) is None
    assert gate.baseline_commit(commits[1], {head, commits[4]}) == commits[4]  # a descendant is never a baseline


def test_gpu_check_without_cuda_skips_the_gpu_sections_and_runs_the_diagnostic_on_cpu(tmp_path):
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "COLLIDE_BENCH_SIZE": "tiny"}  # a tiny inversion
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device: every GPU section is skipped" in proc.stdout
    result = json.loads((tmp_path / "cpu-smoke.json").read_text())
    for name in ("tests", "prefix_attention", "error_bound", "search", "prune", "extraction_mfu", "exhaustive"):
        assert result[name] == {"skipped": "no CUDA device"}, name
    assert set(result["inversion"]) - {"seconds"} in ({"absent"}, {"tracks"})
    diag = result["equal_states"]
    assert "error" not in diag, diag.get("traceback")
    builds = diag["builds"]
    assert set(builds) == {"cpu_then_moved", "device_context", "saved_then_loaded"}
    for how, facts in builds.items():
        weights = facts["weights"]
        assert weights["all_zero_parameters"] == [] and weights["nonfinite_parameters"] == [], how
        assert weights["embedding_duplicate_rows"] == 0 and weights["embedding_zero_rows"] == 1, how  # padding_idx 0
        for path in ("hf_forward", "collide_extract"):
            assert {k: v["equal_pairs"] for k, v in facts[path].items()} == {"1": 0, "9": 0, "18": 0}, (how, path)
            assert all(v["rows"] == diag["n_prompts"] == 24 for v in facts[path].values())
    # on the CPU, building inside `with torch.device("cpu")` and saving/loading change nothing
    assert builds["device_context"]["weights"] == builds["cpu_then_moved"]["weights"] == \
        builds["saved_then_loaded"]["weights"]
