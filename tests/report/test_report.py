"""Per-run report: schema, verdict, collision files, figures, console summary."""

from __future__ import annotations

import io
import json
from importlib.resources import files

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread
from tests.report.fakes import FakeStore, brute_force, fake_run

from collide.config import ReportConfig
from collide.report import add_section, print_summary, write_report
from collide.report.markdown import render_markdown
from collide.search.results import LayerResult, nn_percentiles

SCHEMA = json.loads((files("collide.report") / "report_schema.json").read_text())
N = 30  # prompts of the fake runs; layer 0 groups them by i mod 5: 5 groups of 6 identical states
EMBEDDING_PAIRS = 5 * 6 * 5 // 2  # 5 x C(6, 2) colliding pairs at layer 0


def _write(tmp_path, cfg=ReportConfig(figures=False), **kwargs):
    run_info, results, store = fake_run(n=N, **kwargs)
    return write_report(tmp_path, run_info, results, store, cfg)


def test_report_json_validates_and_keeps_every_collision(tmp_path):
    report = _write(tmp_path, ReportConfig(max_collisions_listed=4, figures=True), collide_at=(2,), uncertified=(3,))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(on_disk)
    assert on_disk == json.loads(json.dumps(report))
    layer0, layer2 = on_disk["layers"][0], on_disk["layers"][2]
    assert layer0["is_embedding_layer"] and layer0["n_collisions"] == EMBEDDING_PAIRS
    assert len(layer0["collisions"]) == 4  # the JSON sample is capped...
    full = pq.read_table(tmp_path / "collisions" / "layer=0.parquet")
    assert full.num_rows == EMBEDDING_PAIRS  # ...the Parquet list is not
    assert layer2["n_collisions"] == 1 and layer2["collisions"][0]["a"] == 103 and layer2["collisions"][0]["b"] == 107
    assert layer2["collisions"][0]["distance"] == pytest.approx(1e-9 * np.sqrt(8), rel=1e-6)
    assert pq.read_table(tmp_path / "collisions" / "layer=4.parquet").num_rows == 0  # written even when empty
    assert on_disk["layers"][3]["certified"] is False
    assert on_disk["timings"]["report"] > 0 and on_disk["timings"]["extract"] == 10.25
    assert on_disk["n_prompts"] == N and on_disk["layer_convention"]["final_norm"] == "post"


def test_schema_allows_the_exhaustive_section_and_rejects_a_squared_negative(tmp_path):
    report = json.loads(json.dumps(_write(tmp_path)))
    report["exhaustive"] = {"layers": [{"layer": 4, "n_pairs": 10, "min_distance": 0.5}]}
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
    report["layers"][1]["min_distance"] = -1.0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(report)


def test_verdict_with_planted_collisions_lists_the_pairs(tmp_path):
    report = _write(tmp_path, collide_at=(2, 3))
    v = report["verdict"]
    assert v["status"] == "collisions" and v["n_collisions"] == 2 and v["embedding_collisions"] == EMBEDDING_PAIRS
    assert "2 colliding pairs (L2 < 1e-6) at layers 2, 3" in v["text"]
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: collisions found.**" in md
    section = md.split("## Colliding pairs")[1].split("## Closest pairs")[0]
    assert "### Layer 2: 1 pair" in section and "### Layer 3: 1 pair" in section
    assert "text of prompt 103" in section and "text of prompt 107" in section


def test_verdict_without_collisions_does_not_count_layer_0(tmp_path):
    report = _write(tmp_path, n_layers=4)
    v = report["verdict"]
    assert v["status"] == "no_collisions" and v["n_collisions"] == 0
    pairs = N * (N - 1) // 2
    assert v["text"].startswith(f"no collisions below 1e-6 in {4 * pairs:,} pairs across 4 layers "
                                f"({pairs:,} per layer)")
    assert f"Layer 0 (embeddings): {EMBEDDING_PAIRS} colliding pairs, expected" in v["text"]
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: injective on this sample.**" in md and "## Colliding pairs" not in md
    assert "| 0 (embeddings) |" in md
    assert v["min_distance"] == min(e["min_distance"] for e in report["layers"][1:])


def test_verdict_is_inconclusive_when_a_layer_is_not_certified(tmp_path):
    v = _write(tmp_path, uncertified=(2, 3))["verdict"]
    assert v["status"] == "inconclusive" and "layers 2, 3 are not certified" in v["text"]


def test_only_layer_0_gives_no_verdict(tmp_path):
    run_info, results, store = fake_run(n=N)
    v = write_report(tmp_path, run_info, results[:1], store, ReportConfig(figures=False))["verdict"]
    assert v["status"] == "no_contextual_layers" and v["n_layers"] == 0 and v["min_distance"] is None


def test_invalid_rows_are_reported_as_prompt_ids_and_make_the_verdict_inconclusive(tmp_path):
    run_info, results, store = fake_run(n=N)
    x = np.random.default_rng(1).normal(size=(N, 8))
    x[4, 2] = np.nan
    results[1] = LayerResult(1, results[1].prompt_ids, brute_force(x, 1e-6))
    report = write_report(tmp_path, run_info, results, store, ReportConfig(figures=False))
    assert report["layers"][1]["invalid_rows"] == [104]
    assert report["layers"][1]["n_pairs"] == (N - 1) * (N - 2) // 2
    assert report["verdict"]["status"] == "inconclusive" and "NaN/Inf" in report["verdict"]["text"]


def test_closest_pair_texts_and_a_store_without_text(tmp_path):
    run_info, results, _ = fake_run(n=N, collide_at=(2,))
    store = FakeStore({103: "def f(x):\n    return ```x```", 107: "def f(x):\n    return ```y```"})
    report = write_report(tmp_path, run_info, results, store, ReportConfig(figures=False))
    assert report["layers"][2]["closest_pair"] == [103, 107]
    assert report["prompt_texts"] == {"103": store.text[103], "107": store.text[107]}
    md = render_markdown(report)
    closest = md.split("## Closest pairs")[1]
    assert "prompts 103 and 107" in closest and "````text\ndef f(x):\n    return ```x```\n````" in closest
    other = report["layers"][1]["closest_pair"][0]
    assert f"prompt {other} (text not stored)" in closest


def test_a_section_added_later_is_replaced_by_its_command_and_kept_by_a_rewrite(tmp_path):
    run_info, results, store = fake_run(n=N)
    write_report(tmp_path, run_info, results, store, ReportConfig(figures=False))
    add_section(tmp_path, "probe", {"accuracy": 0.5}, "## Probes\n\nfirst\n", "probe/probe.png")
    add_section(tmp_path, "probe", {"accuracy": 0.75}, "## Probes\n\nsecond\n", "probe/probe.png")
    md = (tmp_path / "report.md").read_text()
    assert md.count("## Probes") == 1 and "second" in md and "first" not in md
    assert "<!-- collide.probe:probe:begin -->" in md
    write_report(tmp_path, run_info, results, store, ReportConfig(figures=False))  # the run's command again
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["probe"] == {"accuracy": 0.75} and report["figures"] == ["probe/probe.png"]
    assert (tmp_path / "report.md").read_text().count("## Probes\n\nsecond\n") == 1


def test_nn_percentiles_ignore_invalid_rows():
    nn = np.array([np.nan, 4.0, 1.0, 3.0, 2.0, np.inf])
    p = nn_percentiles(nn)
    assert p["min"] == 1.0 and p["max"] == 4.0 and p["p50"] == 2.5 and p["p25"] == 1.75
    assert nn_percentiles(np.array([np.nan])) is None


@pytest.mark.parametrize("n_layers", [4, 31])
def test_figures_are_png_images_of_the_expected_size(tmp_path, n_layers):
    report = _write(tmp_path, ReportConfig(), n_layers=n_layers, collide_at=(2,), uncertified=(3,))
    assert report["figures"] == ["figures/min_distance.png", "figures/nn_boxplot.png"]
    for name in report["figures"]:
        image = imread(tmp_path / name)
        assert image.shape[:2] == (450, 800)
        assert image[..., :3].std() > 0.05  # not a blank canvas
    assert "![min_distance](figures/min_distance.png)" in (tmp_path / "report.md").read_text()


def test_no_figures_when_disabled(tmp_path):
    report = _write(tmp_path, ReportConfig(figures=False))
    assert report["figures"] == [] and not (tmp_path / "figures").exists()


def test_print_summary_shows_each_layer_and_the_verdict(tmp_path):
    from rich.console import Console

    report = _write(tmp_path, collide_at=(2,))
    out = io.StringIO()
    print_summary(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "collisions found: 1 colliding pair (L2 < 1e-6) at layer 2" in text
    assert "0 (emb)" in text and text.count("yes") == 5


def test_report_of_the_real_search_on_planted_near_duplicates(tmp_path):
    from collide.search import min_pairwise

    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 64)) * 100
    x[0, 5] = 5000.0  # a massive dimension
    x[50] = x[10]
    x[50, 0] += 5e-7  # L2 5e-7: a collision
    x[60] = x[20]
    x[60, 1] += 2e-6  # L2 2e-6: above the threshold
    ids = np.arange(1000, 1200, dtype=np.int64)
    results = [LayerResult(layer, ids, min_pairwise(x, 1e-6, backend="torch")) for layer in (0, 1)]
    run_info, _, store = fake_run(n_layers=1, n=200)
    report = write_report(tmp_path, run_info, results, store, ReportConfig(figures=False))
    jsonschema.Draft202012Validator(SCHEMA).validate(json.loads((tmp_path / "report.json").read_text()))
    layer1 = report["layers"][1]
    assert layer1["certified"] and layer1["n_collisions"] == 1 and layer1["closest_pair"] == [1010, 1050]
    assert layer1["collisions"][0]["a"] == 1010 and layer1["collisions"][0]["b"] == 1050
    assert layer1["min_distance"] == pytest.approx(5e-7, rel=1e-6)
    assert layer1["nn_distance"]["min"] == pytest.approx(layer1["min_distance"], rel=1e-6)
    table = pq.read_table(tmp_path / "collisions" / "layer=1.parquet").to_pylist()
    assert [(r["a"], r["b"]) for r in table] == [(1010, 1050)]
    assert report["verdict"]["status"] == "collisions"
