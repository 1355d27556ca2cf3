"""The exhaustive continuation test: engine exactness, planted collisions, pair counts, resume, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from collide.config import ModelConfig
from collide.exhaustive.config import ExhaustiveConfig
from collide.continuations import continuation_states, full_forward_states, input_groups
from collide.errors import CollideError
from collide.exhaustive.driver import exhaustive_test as run
from collide.cli import compose as cli_compose, main as cli_main
from collide.exhaustive.inputs import validate
from collide.extract import BF16_RTOL
from collide.models import load_model
from collide.search import min_pairwise
from collide.store import open_store

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "collide" / "report" / "report_schema.json").read_text())
FAMILIES = ["gpt2", "llama", "mistral", "phi3", "qwen2", "gemma3_text", "gemma3", "gpt_neo"]
PREFIX = [256] + list(b"The injectivity of language models.")  # 36 tokens: past the tiny Gemma's window of 8


def tiny(family: str, seed: int = 0):
    return load_model(ModelConfig(name=f"tiny-{family}", source=f"random:{family}", family=family, seed=seed))


def collect(blocks) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    blocks = list(blocks)
    layers = blocks[0].states.keys()
    return (np.concatenate([b.tokens for b in blocks]),
            {k: torch.cat([b.states[k] for b in blocks]).numpy() for k in layers})


def untimed(result: dict) -> list[dict]:
    """Every set's per-layer results without their timings."""
    return [{**e, "seconds": None} for s in result["sets"] for e in s["layers"]]


def plant_duplicate(lm, a: int, b: int) -> None:
    """Make input-embedding row b a bitwise copy of row a."""
    weight = lm.model.get_input_embeddings().weight
    weight.data[b] = weight.data[a]


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_continuations_equal_full_forwards(family):
    lm = tiny(family)
    layers = list(range(lm.n_layers + 1))
    tokens = np.random.default_rng(1).choice(320, 40, replace=False)
    got_tokens, got = collect(continuation_states(lm, PREFIX, tokens, layers, batch_size=16))
    ref_tokens, ref = collect(full_forward_states(lm, PREFIX, tokens, layers, batch_size=16))
    np.testing.assert_array_equal(got_tokens, ref_tokens)
    for k in layers:
        scale = np.abs(ref[k]).max()
        assert np.abs(got[k] - ref[k]).max() <= 2e-6 * max(scale, 1.0), (family, k)
    assert not np.array_equal(got[lm.n_layers][0], got[lm.n_layers][1])  # distinct tokens, distinct states


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_continuations_within_the_bf16_tolerance(family):
    lm = load_model(ModelConfig(name="tiny", source=f"random:{family}", family=family, dtype="bf16"))
    layers = [1, lm.n_layers]
    tokens = np.arange(10, 50)
    _, got = collect(continuation_states(lm, PREFIX, tokens, layers, batch_size=16))
    _, ref = collect(full_forward_states(lm, PREFIX, tokens, layers, batch_size=16))
    for k in layers:
        rel = np.linalg.norm(got[k] - ref[k], axis=1) / np.linalg.norm(ref[k], axis=1)
        assert rel.max() <= BF16_RTOL, (family, k, rel.max())


def test_resume_point_gives_the_same_blocks_bitwise():
    lm = tiny("llama")
    tokens = np.arange(100)
    whole = list(continuation_states(lm, PREFIX, tokens, [1, 4], batch_size=16))
    resumed = list(continuation_states(lm, PREFIX, tokens, [1, 4], batch_size=16, start=48))
    assert len(resumed) == len(whole) - 3
    for a, b in zip(whole[3:], resumed):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert all(torch.equal(a.states[k], b.states[k]) for k in (1, 4))
    with pytest.raises(ValueError, match="start=50"):
        next(continuation_states(lm, PREFIX, tokens, [1], batch_size=16, start=50))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_planted_duplicate_embedding_collides_at_every_layer(family):
    lm = tiny(family)
    plant_duplicate(lm, 70, 300)
    layers = list(range(lm.n_layers + 1))
    first, group = input_groups(lm, np.arange(320))
    assert len(first) == 319 and group[300] == group[70]
    # tokens 70 and 300 fall in different batches of 16 distinct inputs; the engine still gives them one state
    row_tokens, states = collect(continuation_states(lm, PREFIX, np.arange(320), layers, batch_size=16))
    rows = [int(np.nonzero(row_tokens == t)[0][0]) for t in (70, 300)]
    for k in layers:
        res = min_pairwise(states[k], threshold=1e-6)
        assert res.certified and res.distance == 0.0, (k, res.distance)
        assert res.n_collisions == 1 and tuple(res.pair) == tuple(sorted(rows)), k


# --------------------------------------------------------------------------- the command


TINY_RUN = ["model=tiny-random", "corpus=stdlib-docs", "n_prompts=40", "extract.progress=false",
            "search.progress=false"]


@pytest.fixture(scope="module")
def tiny_overrides(tmp_path_factory):
    """TINY_RUN with its store under a temporary store.root."""
    return TINY_RUN + [f"store.root={tmp_path_factory.mktemp('stores')}"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, compose, tiny_overrides):
    """A finished `python -m collide` run of the tiny random Llama on 40 stdlib-docs prompts."""
    from collide.pipeline import run_pipeline as run_collide

    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    run_collide(compose(tiny_overrides), run_dir, "python -m collide model=tiny-random n_prompts=40")
    return run_dir


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def config(run_dir, **overrides) -> ExhaustiveConfig:
    cfg = ExhaustiveConfig(run_dir=str(run_dir), progress=False, **overrides)
    cfg.search.progress = False
    return cfg


def test_pair_counts_are_exact_and_match_a_brute_force(run_copy):
    cfg = config(run_copy, n_prompts=3, vocab=50, layers=[2, 4], across_sets=True, batch_size=8, shard_rows=20)
    result = run(cfg)
    assert result["n_sets"] == 3 and len({s["base_prompt_id"] for s in result["sets"]}) == 3
    for entry in result["per_layer"]:
        assert entry["n_pairs"] == 3 * (50 * 49 // 2) == result["n_pairs_per_layer"]
        assert entry["certified"] and entry["n_collisions_identical_inputs"] == 0
        assert entry["distinct_inputs"]["min_distance"] == entry["min_distance"]
    assert [e["n_pairs"] for e in result["across_sets"]] == [150 * 149 // 2] * 2
    store = open_store(run_copy / result["store"])
    assert result["store"].startswith("exhaustive/stores/sets3-tokens50-")
    assert store.complete and store.n_rows == 150 and store.layers == [2, 4]
    table = store.prompts(["prompt_id", "set_index", "base_prompt_id", "appended_token", "token_ids"])
    assert table.column("set_index").to_pylist() == [0] * 50 + [1] * 50 + [2] * 50

    # set 1, layer 4: the certified minimum equals fp64 brute force over full forwards of prefix+token
    lm = load_model(ModelConfig(**store.manifest["identity"]["model"]))
    base = result["sets"][1]["base_prompt_id"]
    prefix = open_store(json.loads((run_copy / "store.json").read_text())["path"]).prompts(["token_ids"]).column("token_ids")[base].as_py()
    tokens = np.array(table.column("appended_token").to_pylist()[50:100])
    assert table.column("token_ids")[50].as_py() == prefix + [int(tokens[0])]
    _, ref = collect(full_forward_states(lm, prefix, tokens, [4], batch_size=25))
    brute = pdist(ref[4].astype(np.float64)).min()
    assert result["sets"][1]["layers"][1]["min_distance"] == pytest.approx(brute, rel=1e-5)


def test_planted_duplicate_found_through_the_command(run_copy, monkeypatch):
    import collide.exhaustive.driver as exhaustive

    def load_planted(cfg):
        lm = load_model(cfg)
        plant_duplicate(lm, 101, 202)
        return lm

    monkeypatch.setattr(exhaustive, "load_model", load_planted)
    result = run(config(run_copy, n_prompts=2, layers="all", batch_size=32))
    for entry in result["per_layer"]:
        assert entry["min_distance"] == 0.0 and entry["certified"], entry["layer"]
        assert entry["n_collisions"] == 2  # one per set: tokens 101 and 202 after each base prompt
        assert sorted(entry["closest_pair"]["tokens"]) == [101, 202]
        # counted apart: the pairs with different inputs do not collide, and exclude the planted pair
        assert entry["n_collisions_identical_inputs"] == 2 and entry["distinct_inputs"]["n_collisions"] == 0
        assert entry["distinct_inputs"]["min_distance"] > 1e-3
        assert entry["distinct_inputs"]["n_pairs"] == 2 * (319 * 318 // 2)
        assert sorted(entry["distinct_inputs"]["closest_pair"]["tokens"]) != [101, 202]
    assert result["tokens"]["duplicate_input_groups"] == [[101, 202]]
    report = json.loads((run_copy / "report.json").read_text())
    assert report["exhaustive"]["per_layer"][-1]["n_collisions"] == 2
    assert "collide at every layer by construction" in (run_copy / "report.md").read_text()


def test_selection_report_and_rerun(run_copy, compose, tiny_overrides):
    import jsonschema

    first = run(config(run_copy, n_prompts=4, vocab=30, batch_size=16))
    # base prompts: the endpoints of the closest pairs of the run at its deepest layer
    run_report = json.loads((run_copy / "report.json").read_text())
    closest = run_report["layers"][-1]["closest_pair"]
    assert sorted(first["selection"]["prompt_ids"][:2]) == sorted(closest)
    assert first["layers"] == [4] and first["selection"]["layer"] == 4
    nn = first["selection"]["nn_distance"]
    assert nn == sorted(nn) and nn[0] == pytest.approx(run_report["layers"][-1]["min_distance"])
    jsonschema.Draft202012Validator(SCHEMA).validate(run_report)
    assert run_report["exhaustive"]["n_pairs_per_layer"] == 4 * (30 * 29 // 2)
    assert "exhaustive/exhaustive.png" in run_report["figures"]
    closest_pair = run_report["exhaustive"]["per_layer"][0]["distinct_inputs"]["closest_pair"]
    md = (run_copy / "report.md").read_text()
    assert md.count("## Exhaustive continuation test") == 1
    assert f"after prompt {closest_pair['base_prompt_id']}" in md
    assert json.dumps(closest_pair["token_texts"][0], ensure_ascii=False) in md
    png = (run_copy / "exhaustive" / "exhaustive.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    second = run(config(run_copy, n_prompts=4, vocab=30, batch_size=16))  # finished: reuses every set
    assert second["per_layer"] == first["per_layer"]
    assert second["timings"]["extract_s"] == first["timings"]["extract_s"]
    assert (run_copy / "report.md").read_text().count("## Exhaustive continuation test") == 1

    from collide.pipeline import run_pipeline as run_collide  # the run's own command again rewrites its report

    before = json.loads((run_copy / "report.json").read_text())
    run_collide(compose(tiny_overrides), run_copy, "python -m collide model=tiny-random n_prompts=40")
    rewritten = json.loads((run_copy / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(rewritten)
    assert rewritten["exhaustive"] == before["exhaustive"] and "exhaustive/exhaustive.png" in rewritten["figures"]
    assert rewritten["layers"][-1]["min_distance"] == before["layers"][-1]["min_distance"]
    assert (run_copy / "report.md").read_text().count("## Exhaustive continuation test") == 1


def test_stores_are_keyed_by_content_and_a_larger_one_serves(run_copy, monkeypatch):
    import collide.exhaustive.modes as modes

    one = run(config(run_copy, n_prompts=1, vocab=20, layers=[2, 4], batch_size=8))
    two = run(config(run_copy, n_prompts=2, vocab=20, layers=[2, 4], batch_size=8))  # another store, no error
    assert one["store"] != two["store"] and (run_copy / one["store"]).is_dir() and (run_copy / two["store"]).is_dir()
    assert [e["min_distance"] for e in two["sets"][0]["layers"]] == [e["min_distance"] for e in one["sets"][0]["layers"]]
    shutil.rmtree(run_copy / one["store"])
    shutil.rmtree(run_copy / "exhaustive" / "sets")

    def no_extraction(*args, **kwargs):
        raise AssertionError("a complete larger store serves this test: nothing is extracted")

    monkeypatch.setattr(modes, "extract_set", no_extraction)
    served = run(config(run_copy, n_prompts=1, vocab=20, layers=[4], batch_size=8))  # first set, one layer
    assert served["store"] == two["store"] and served["layers"] == [4]
    assert served["per_layer"][0]["min_distance"] == one["per_layer"][1]["min_distance"]
    assert served["per_layer"][0]["certified"]


def test_margin_mode(run_copy):
    result = run(config(run_copy, mode="margin", n_prompts=3, n_tokens=40, batch_size=16))
    assert result["layers"] == [0, 1, 2, 3, 4] and [s["base_prompt_id"] for s in result["sets"]] == [0, 1, 2]
    for slot, entry in enumerate(result["per_layer"]):
        mins = [s["layers"][slot]["min_distance"] for s in result["sets"]]
        assert entry["mean_min_distance"] == pytest.approx(np.mean(mins))
        assert entry["n_pairs"] == 3 * (40 * 39 // 2) and entry["paper_gpt2_small"] is None
    report = json.loads((run_copy / "report.json").read_text())
    assert report["exhaustive_margin"]["per_layer"] == result["per_layer"]
    assert "## Margin of single-token continuations" in (run_copy / "report.md").read_text()


def parse_args(argv: list[str]):
    """What `collide exhaustive ARGV` runs with: the composed config, validated."""
    cfg = cli_compose("exhaustive", argv)
    validate(cfg)
    return cfg


def main(argv: list[str]) -> int:
    return cli_main(["exhaustive", *argv])


def test_typo_and_bad_values_are_one_line_errors(run_copy):
    with pytest.raises(CollideError, match="vocabb"):
        parse_args([str(run_copy), "vocabb=5"])
    with pytest.raises(CollideError, match="search.blockrows"):
        parse_args([str(run_copy), "search.blockrows=5"])
    with pytest.raises(CollideError, match="n_prompts"):
        parse_args([str(run_copy), "n_prompts=many"])
    with pytest.raises(CollideError, match="vocab=0"):
        parse_args([str(run_copy), "vocab=0"])
    assert parse_args([str(run_copy), "prompt_ids=[3,1]", "search.block_rows=64"]).prompt_ids == [3, 1]
    assert parse_args([str(run_copy), "layers=1:3"]).layers == "1:3"  # a range, not the base-60 int 63
    with pytest.raises(CollideError, match=r"prompt_ids \[99\]"):
        run(config(run_copy, prompt_ids=[99]))
    with pytest.raises(CollideError, match="layers=9"):
        run(config(run_copy, layers=9))
    proc = subprocess.run([sys.executable, "-m", "collide.exhaustive", str(run_copy), "n_promts=3"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "n_promts" in proc.stderr
    assert main([str(run_copy / "missing")]) == 2
    (run_copy / "report.json").write_text('{"store": "store", "thresh')  # cut short
    with pytest.raises(CollideError, match=r"report.json .*rerun the run's own `python -m collide`") as err:
        run(config(run_copy, n_prompts=2, vocab=10))
    assert "\n" not in str(err.value)


def test_killed_run_resumes_to_identical_results(tiny_run, tmp_path):
    """SIGKILL mid-way through the second set, rerun: same store (bitwise) and same results as one clean run."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    shutil.copytree(tiny_run, clean)
    shutil.copytree(tiny_run, killed)
    args = ["n_prompts=4", "layers=[1,4]", "batch_size=8", "shard_rows=40", "progress=false", "search.progress=false"]
    command = [sys.executable, "-m", "collide.exhaustive"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command + [str(killed)] + args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    def only_store(run_dir: Path) -> Path:  # the test's one store, keyed by its content
        found = list((run_dir / "exhaustive" / "stores").glob("*/manifest.json"))
        return found[0].parent if len(found) == 1 else run_dir / "exhaustive" / "stores" / "none"

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        manifest = only_store(killed) / "manifest.json"
        if manifest.is_file():
            try:
                rows = json.loads(manifest.read_text())["counts"]["n_prompts"]
            except (ValueError, KeyError):
                rows = 0
            if rows > 320:  # set 0 done, set 1 begun
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (killed / "exhaustive" / "exhaustive.json").exists()
    partial = open_store(only_store(killed))
    assert not partial.complete and 320 < partial.n_rows < 4 * 320

    assert main([str(killed)] + args) == 0
    assert main([str(clean)] + args) == 0
    a, b = (json.loads((d / "exhaustive" / "exhaustive.json").read_text()) for d in (clean, killed))
    assert a["per_layer"] == b["per_layer"]
    assert untimed(a) == untimed(b)
    assert only_store(clean).name == only_store(killed).name
    sa, sb = open_store(only_store(clean)), open_store(only_store(killed))
    assert sb.complete and sa.n_rows == sb.n_rows == 4 * 320
    for k in (1, 4):
        ia, xa = sa.layer(k)
        ib, xb = sb.layer(k)
        np.testing.assert_array_equal(ia, ib)
        assert np.array_equal(xa, xb), k
