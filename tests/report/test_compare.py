"""Cross-run comparison: depth normalisation, sweep expansion, mismatched and incomplete runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from matplotlib.image import imread
from tests.report.fakes import fake_run

from collide.report.__main__ import main
from collide.report.compare import compare
from collide.config import ReportConfig
from collide.errors import CollideError
from collide.report import write_report


def _run(path, **kwargs):
    run_info, results, store = fake_run(n=20, d=6, **kwargs)
    write_report(path, run_info, results, store, ReportConfig(figures=False))
    return path


@pytest.fixture
def sweep(tmp_path):
    """A multirun sweep dir: jobs 0 (L=4), 2 (L=30) and 10 (L=4, bf16) finished, job 1 failed."""
    root = tmp_path / "multirun"
    _run(root / "0-tiny-stdlib-docs", n_layers=4, model="tiny")
    (root / "1-gpt2-stdlib-docs" / ".hydra").mkdir(parents=True)
    _run(root / "2-deep-stdlib-docs", n_layers=30, model="deep", seed=1)
    _run(root / "10-tiny-stdlib-docs", n_layers=4, model="tiny", dtype="bf16", seed=2)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_runs_of_different_depth_share_the_relative_axis(sweep, tmp_path):
    summary = compare([sweep], tmp_path / "out")
    runs = {r["dir"].rsplit("/", 1)[1]: r for r in summary["runs"]}
    shallow, deep = runs["0-tiny-stdlib-docs"], runs["2-deep-stdlib-docs"]
    assert [p["depth"] for p in shallow["per_layer"]] == [0, 0.25, 0.5, 0.75, 1.0]
    assert len(deep["per_layer"]) == 31 and deep["per_layer"][15]["depth"] == 0.5
    report = json.loads((sweep / "2-deep-stdlib-docs" / "report.json").read_text())
    expected = {"1": 1, "L/2": 15, "L": 30}
    assert deep["paper_layers"] == {k: report["layers"][layer]["min_distance"] for k, layer in expected.items()}
    assert imread(tmp_path / "out" / "comparison.png").shape[:2] == (550, 1000)
    on_disk = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert on_disk["depth_axis"] == "relative" and len(on_disk["runs"]) == 4


def test_sweep_jobs_in_job_order_and_the_failed_job_is_reported(sweep, tmp_path):
    summary = compare([sweep], tmp_path / "out")
    names = [r["dir"].rsplit("/", 1)[1] for r in summary["runs"]]
    assert names == ["0-tiny-stdlib-docs", "1-gpt2-stdlib-docs", "2-deep-stdlib-docs", "10-tiny-stdlib-docs"]
    failed = summary["runs"][1]
    assert not failed["complete"] and "no report.json" in failed["problems"][0]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| 1-gpt2-stdlib-docs |" in md and "incomplete" in md


def test_a_mismatched_run_is_flagged_not_mixed(sweep, tmp_path):
    summary = compare([sweep], tmp_path / "out")
    assert summary["differing"] == ["dtype"]
    bf16 = summary["runs"][3]
    assert bf16["problems"] == ["dtype=bf16, others fp32"]
    assert summary["runs"][0]["problems"] == []
    assert summary["runs"][0]["label"] == "tiny / stdlib-docs (0-tiny-stdlib-docs)"  # two tiny runs: dir added
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "**Not like for like:** the runs differ in dtype" in md and "dtype=bf16, others fp32" in md


def test_threshold_mismatch_and_uncertified_layers_are_flagged(tmp_path):
    a = _run(tmp_path / "a", n_layers=4)
    b = _run(tmp_path / "b", n_layers=4, uncertified=(2,))
    c = _run(tmp_path / "c", n_layers=6, threshold=1e-3, final_norm="pre")
    summary = compare([a, b, c], tmp_path / "out")
    assert summary["differing"] == ["threshold", "final_norm"]
    problems = {r["dir"].rsplit("/", 1)[1]: r["problems"] for r in summary["runs"]}
    assert problems == {"a": [], "b": ["layers [2] not certified"],
                        "c": ["threshold=0.001, others 1e-6", "final_norm=pre, others post"]}


def test_cli_absolute_axis_and_console_warnings(sweep, tmp_path, capsys):
    main([str(sweep), "--absolute", "--out", str(tmp_path / "abs")])
    summary = json.loads((tmp_path / "abs" / "comparison.json").read_text())
    assert summary["depth_axis"] == "absolute"
    out = capsys.readouterr().out
    assert "dtype=bf16, others fp32" in out and "no report.json" in out
    main([str(sweep / "0-tiny-stdlib-docs"), "depth_axis=absolute", f"out={tmp_path / 'kv'}"])
    assert json.loads((tmp_path / "kv" / "comparison.json").read_text())["depth_axis"] == "absolute"


def test_module_entry_point_and_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "collide.report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("collide: error: no report.json under")
    with pytest.raises(CollideError, match="does not exist"):
        compare([tmp_path / "missing"], tmp_path / "out")
