"""The benchmark harness (benchmarks/run.py): regression gate, baselines, history."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
bench = sys.modules["bench_run"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bench)

RESULT = {"ratios": {"speedup": {"value": 2.0, "better": "higher", "target": 1.5},
                     "memory": {"value": 1.0, "better": "lower", "target": None}},
          "exact": {"min_distance": 0.123456789012345, "planted_collisions_found": True, "n_collisions": 3},
          "figures": {"seconds": 12.0}}
MACHINE = {"name": "box", "cpu": "AMD EPYC", "cores": 2, "gpu": None}


def _with(**changes) -> dict:
    """RESULT with ratio values (name=value) or exact entries (exact_name=value) replaced."""
    result = json.loads(json.dumps(RESULT))
    for key, value in changes.items():
        if key.startswith("exact_"):
            result["exact"][key.removeprefix("exact_")] = value
        else:
            result["ratios"][key]["value"] = value
    return result


def _record(result, gate="pass", machine=MACHINE, mode="quick"):
    return {"bench": "x", "machine": machine, "mode": mode, "gate": gate, **result}


def _failed(findings):
    return sorted((f.kind, f.name) for f in findings if f.failed)


def test_unchanged_result_passes():
    assert _failed(bench.gate("x", RESULT, _record(RESULT))) == []


@pytest.mark.parametrize("changes, failed", [
    ({"speedup": 1.6}, [("ratio", "speedup")]),  # higher is better, 20% worse
    ({"memory": 1.2}, [("ratio", "memory")]),  # lower is better, 20% worse
    ({"speedup": 1.9, "memory": 1.05}, []),  # 5% worse: noise, passes
    ({"speedup": 3.0, "memory": 0.5}, []),  # better passes
])
def test_ratio_regressions_over_ten_percent_fail(changes, failed):
    assert _failed(bench.gate("x", _with(**changes), _record(RESULT))) == failed


@pytest.mark.parametrize("changes", [{"exact_planted_collisions_found": False}, {"exact_n_collisions": 2},
                                     {"exact_min_distance": 0.123456789012346}, {"exact_n_collisions": 3.0}])
def test_any_exactness_change_fails(changes):
    assert _failed(bench.gate("x", _with(**changes), _record(RESULT))) == [("exact", next(iter(changes))[6:])]


def test_a_lost_exact_entry_fails_and_a_missed_target_only_warns():
    result = _with(speedup=1.0)
    del result["exact"]["planted_collisions_found"]
    findings = bench.gate("x", result, _record(_with(speedup=1.05)))
    assert _failed(findings) == [("exact", "planted_collisions_found")]
    assert [f.message for f in findings if f.kind == "target"] == ["1 misses its target 1.5"]


def test_first_run_has_nothing_to_compare():
    findings = bench.gate("x", RESULT, None)
    assert _failed(findings) == [] and "no baseline yet" in findings[0].message


def test_baseline_is_the_last_passing_run_on_the_same_machine_and_mode():
    other = {**MACHINE, "cores": 16}
    history = [_record(_with(speedup=1.0)), _record(_with(speedup=2.0)), _record(_with(speedup=1.5), gate="fail"),
               _record(_with(speedup=9.0), machine=other), _record(_with(speedup=8.0), mode="full")]
    assert bench.baseline(history, "x", MACHINE, "quick")["ratios"]["speedup"]["value"] == 2.0
    assert bench.baseline(history, "x", other, "quick")["ratios"]["speedup"]["value"] == 9.0
    assert bench.baseline(history, "y", MACHINE, "quick") is None


FAKE_MODULE = '''
import json
from pathlib import Path

def run(quick=True):
    knobs = json.loads(Path(__file__).with_suffix(".json").read_text())
    if knobs.get("crash"):
        raise RuntimeError("planted crash")
    return {"ratios": {"speedup": {"value": knobs["speedup"], "better": "higher", "target": 1.5}},
            "exact": {"planted_collisions_found": knobs["found"]}, "figures": {"seconds": 1.0 if quick else 9.0}}
'''


def test_harness_end_to_end_trips_on_planted_slowdown_and_exactness_loss(tmp_path):
    (tmp_path / "bench_fake.py").write_text(FAKE_MODULE)
    knobs = tmp_path / "bench_fake.json"
    results = tmp_path / "results"
    args = ["--bench-dir", str(tmp_path), "--results", str(results), "--machine", "test-box"]

    def run_with(**k):
        knobs.write_text(json.dumps({"speedup": 2.0, "found": True, **k}))
        return bench.main(args)

    assert run_with() == 0 and run_with() == 0
    assert run_with(speedup=1.6) == 1  # a ratio 20% worse
    assert run_with(speedup=1.95) == 0  # compared with the last passing run, not the failed one
    assert run_with(found=False) == 1  # a planted collision missed
    assert run_with(crash=True) == 1
    history = bench.load_history(results / "history.jsonl")
    assert [r["gate"] for r in history] == ["pass", "pass", "fail", "pass", "fail", "fail"]
    first = history[0]
    assert first["machine"]["name"] == "test-box" and first["mode"] == "quick" and first["date"]
    assert first["commit"] is None or len(first["commit"]) == 40
    assert first["exact"] == {"planted_collisions_found": True} and first["peak_rss_mib"] > 0
    assert imread(results / "history.png").shape[:2] == (340, 1000)
    assert "planted crash" not in (results / "latest.md").read_text()  # the crash is named by exit status
    assert "bench_fake.py exited with status 1" in (results / "latest.md").read_text()
    assert run_with(found=False) == 1 and bench.main(args + ["--accept"]) == 0  # accept the new exact value
    assert run_with(found=False) == 0


def test_only_rejects_an_unknown_module(tmp_path):
    (tmp_path / "bench_fake.py").write_text(FAKE_MODULE)
    with pytest.raises(SystemExit, match="no benchmark named nope; choose from fake"):
        bench.main(["--bench-dir", str(tmp_path), "--results", str(tmp_path), "--only", "nope"])
