"""The geometric diagnostics (collide/report/diagnostics.py): token edit distances, nearest rows, the separation
margin and co-Lipschitz estimate on planted states, and their place in report.json, report.md and compare."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from collide.report.diagnostics import edit_distances, layer_diagnostics, quantization_record

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "collide" / "report" / "report_schema.json").read_text())


def levenshtein(a, b) -> int:
    d = np.zeros((len(a) + 1, len(b) + 1), int)
    d[:, 0], d[0, :] = range(len(a) + 1), range(len(b) + 1)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (a[i - 1] != b[j - 1]))
    return int(d[-1, -1])


def test_edit_distances_match_the_textbook_recurrence():
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 4, rng.integers(0, 10)).tolist() for _ in range(200)]
    b = [rng.integers(0, 4, rng.integers(0, 10)).tolist() for _ in range(200)]
    assert edit_distances(a, b).tolist() == [levenshtein(x, y) for x, y in zip(a, b)]
    assert edit_distances([[1, 2, 3]], [[1, 2, 3]]).tolist() == [0]
    assert edit_distances([[5, 1, 2, 3]], [[1, 2, 3]]).tolist() == [1]  # one deletion, not 4 substitutions


def _result(x: np.ndarray):
    """The certified search of x with every row's nearest neighbour (what the report reads)."""
    from collide.search import min_pairwise

    return min_pairwise(x, 1e-6, nearest=True, progress=False)


def test_layer_diagnostics_on_planted_states():
    # four prompts: 0 and 1 are one token edit apart and 0.5 apart in state space; 2 and 3 two edits and 3.0
    tokens = [[1, 2, 3], [1, 2, 4], [7, 8, 9], [9, 9]]
    x = np.array([[10.0, 0, 0], [10.5, 0, 0], [0, 20.0, 0], [0, 23.0, 0]])
    res = _result(x)
    assert res.nn_index.tolist() == [1, 0, 3, 2]
    out = layer_diagnostics(res, tokens, prompt_ids=np.array([5, 6, 7, 8]))
    norms = np.linalg.norm(x, axis=1)
    assert out["separation_margin"] == 0.5
    assert out["state_norm_p50"] == pytest.approx(np.median(norms))
    assert out["relative_margin"] == pytest.approx(0.5 / np.median(norms))
    centred = np.linalg.norm(x - x.mean(0), axis=1)
    assert out["centred_norm_p50"] == pytest.approx(np.median(centred), rel=1e-6)  # rows rounded to fp32 once
    assert out["relative_margin_centred"] == pytest.approx(0.5 / np.median(centred), rel=1e-6)
    c = out["co_lipschitz"]
    assert c["min"] == pytest.approx(0.5) and c["pair"] == [5, 6] and c["pair_prompt_distance"] == 1
    assert c["p50"] == pytest.approx(np.median([0.5, 0.5, 1.5, 1.5])) and c["n_pairs"] == 4 and not c["sampled"]
    # with a sample smaller than the rows, the closest pair's rows are always kept
    out = layer_diagnostics(res, tokens, max_rows=1, seed=3)
    assert out["co_lipschitz"]["min"] == pytest.approx(0.5) and out["co_lipschitz"]["sampled"]
    assert out["co_lipschitz"]["n_pairs"] in (2, 3)


def test_layer_diagnostics_read_the_search_not_the_states():
    """The co-Lipschitz pairs are the search's nn pairs, ties broken as the search breaks them."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)) * 1000 + 5000  # large norms: the Gram form alone would be ambiguous
    x[10] = x[3]
    x[200] = x[3]
    res = _result(x)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (d[np.arange(300), res.nn_index] == d.min(axis=1)).all()
    assert res.nn_index[3] == 10 and res.nn_index[10] == 3 and res.nn_index[200] == 3
    tokens = [[i, i + 1] for i in range(300)]
    out = layer_diagnostics(res, tokens)
    assert out["co_lipschitz"]["min"] == 0.0 and out["co_lipschitz"]["pair"] == [3, 10]


def test_layer_diagnostics_without_nearest_distances():
    from collide.search import min_pairwise

    res = min_pairwise(np.ones((3, 2)), 1e-6, nearest=False, progress=False)
    out = layer_diagnostics(res, [[1], [2], [3]])
    # the minimum (0: identical rows) and its pair are known without nn; nothing else
    assert out["separation_margin"] == 0.0 and out["co_lipschitz"]["n_pairs"] == 2


def test_quantization_record_keeps_model_and_storage_apart():
    report = {"model": {"quant": {"activations": "int4", "weights": "none", "description": "x"}},
              "dtype": "fp32", "store_dtype": "fp32"}
    assert quantization_record(report)["collisions_are"] == "model"
    report["store_dtype"] = "bf16"
    record = quantization_record(report)
    assert record["collisions_are"] == "model_or_storage" and record["storage"] == {"dtype": "bf16", "lossless": False}
    assert record["forward"]["activations"] == "int4"


def test_report_with_diagnostics_validates_and_compares(tiny_store, tmp_path):
    from collide.config import ReportConfig, SearchConfig
    from collide.report import write_report
    from collide.report.compare import compare
    from collide.search import search_store

    results = [search_store(tiny_store, k, 1e-6, SearchConfig(progress=False)) for k in (1, 3)]
    runs = []
    for level in ("none", "int4", "noise"):  # noise: model.noise=gaussian, the control of a quantized forward
        noise = {"noise": "gaussian", "noise_scale": [0.5] * 5} if level == "noise" else {}
        run_info = {"model": {"name": "tiny", "source": "random:llama", "revision": None, "family": "llama",
                              "dtype": "fp32", "final_norm": "post", "n_layers": 4, "d": 64,
                              "quant": {"activations": "int4" if level == "int4" else "none", "weights": "none",
                                        "description": level}, **noise},
                    "corpus": {"name": "synthetic"}, "n_prompts": tiny_store.n_rows, "n_duplicates": 0,
                    "threshold": 1e-6, "layers": [1, 3], "timings": {}, "store": str(tiny_store.path),
                    "command": "test"}
        report = write_report(tmp_path / level, run_info, results, tiny_store, ReportConfig())
        jsonschema.Draft202012Validator(SCHEMA).validate(json.loads((tmp_path / level / "report.json").read_text()))
        runs.append(tmp_path / level)
    assert "figures/diagnostics.png" in report["figures"] and (tmp_path / "int4" / "figures/diagnostics.png").is_file()
    for e, r in zip(report["layers"], results):
        d = e["diagnostics"]
        assert d["separation_margin"] == e["min_distance"]
        assert d["co_lipschitz"]["min"] <= d["co_lipschitz"]["p50"]
        assert d["co_lipschitz"]["n_pairs"] == tiny_store.n_rows
    md = (tmp_path / "int4" / "report.md").read_text()
    assert "## Geometric diagnostics" in md and "| quantized forward | int4 |" in md
    summary = compare(runs, tmp_path / "cmp")
    assert [r["label"] for r in summary["runs"]] == ["tiny / synthetic / fp", "tiny / synthetic / A4",
                                                     "tiny / synthetic / fp+noise"]
    assert "| added noise | gaussian, RMS L2 norm 0.5, 0.5, 0.5, 0.5, 0.5 per layer" in \
        (tmp_path / "noise" / "report.md").read_text()
    cmp_md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Side by side" in cmp_md and (tmp_path / "cmp" / "comparison_diagnostics.png").is_file()
