"""Stores keyed by their content: one extraction serves many searches, and the `collide` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import collide.models
from collide import cli
from collide.pipeline import run_pipeline as run
from collide.store.identity import identity_hash, store_identity, store_location
from collide.errors import CollideError
from collide.layers import parse_layers
from collide.store import open_run_store, open_store

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
QUIET = ["extract.progress=false", "search.progress=false"]
# report fields that say when, where and how long: everything else must be equal between equal runs
VOLATILE = {"created", "timings", "command", "hardware", "git_commit", "git_dirty", "seconds", "store"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _run(compose, tmp_path: Path, name: str, *overrides: str) -> dict:
    cfg = compose(["model=tiny-random", f"store.root={tmp_path / 'stores'}", *QUIET, *overrides])
    return run(cfg, tmp_path / name, "test")


def refuse_to_load(*_, **__):
    """Stands in for collide.models.load_model where a run must not need the model."""
    raise AssertionError("the model was loaded")


def test_runs_that_differ_in_search_or_report_settings_share_one_store(compose, tmp_path, monkeypatch):
    base = ["n_prompts=50", "layers=[0,2,4]"]
    _run(compose, tmp_path, "first", *base)
    stores = list((tmp_path / "stores").iterdir())
    assert len(stores) == 1
    before = {p: p.stat().st_mtime_ns for p in stores[0].rglob("*.parquet")}
    settings = ["threshold=1e-5", "search.block_rows=7", "report.figures=false", "report.max_collisions_listed=3"]
    monkeypatch.setattr(collide.models, "load_model", refuse_to_load)
    second = _run(compose, tmp_path, "second", *base, *settings)
    monkeypatch.undo()
    assert list((tmp_path / "stores").iterdir()) == stores  # no new store
    assert {p: p.stat().st_mtime_ns for p in stores[0].rglob("*.parquet")} == before  # nothing extracted
    record = json.loads((tmp_path / "second" / "store.json").read_text())
    assert record["path"] == str(stores[0].resolve()) and record["served"] == "exact"
    fresh = run(compose(["model=tiny-random", f"store.root={tmp_path / 'fresh'}", *QUIET, *base, *settings]),
                tmp_path / "fresh-run", "test")
    assert _strip(second) == _strip(fresh)
    assert not (tmp_path / "second" / "figures").exists()


def test_a_larger_store_serves_fewer_prompts_and_layers(compose, tmp_path, monkeypatch):
    _run(compose, tmp_path, "big", "n_prompts=60", "layers=[0,2,4]", "store.shard_rows=16")
    monkeypatch.setattr(collide.models, "load_model", refuse_to_load)
    small = _run(compose, tmp_path, "small", "n_prompts=40", "layers=[2,4]", "store.shard_rows=16")
    monkeypatch.undo()
    record = json.loads((tmp_path / "small" / "store.json").read_text())
    assert record["served"] == "subset" and record["n_prompts"] == 40 and record["layers"] == [2, 4]
    assert len(list((tmp_path / "stores").iterdir())) == 1
    assert open_run_store(tmp_path / "small").n_rows == 40 and open_run_store(record["path"]).n_rows == 60
    assert small["n_prompts"] == 40 and [e["n_pairs"] for e in small["layers"]] == [40 * 39 // 2] * 2
    # the subset holds the same prompts, and the same states, as a store made for 40 prompts
    fresh = run(compose(["model=tiny-random", f"store.root={tmp_path / 'fresh'}", "n_prompts=40", "layers=[2,4]",
                         "store.shard_rows=16", *QUIET]), tmp_path / "fresh-run", "test")
    big = open_store(record["path"]).select(40)
    own = open_store(json.loads((tmp_path / "fresh-run" / "store.json").read_text())["path"])
    assert big.prompts(["token_ids"]).equals(own.prompts(["token_ids"]))
    for layer in (2, 4):
        np.testing.assert_allclose(big.layer(layer)[1], own.layer(layer)[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(small["layers"], fresh["layers"]):
        assert a["closest_pair"] == b["closest_pair"]
        assert a["min_distance"] == pytest.approx(b["min_distance"], rel=1e-4)


def test_a_store_that_cannot_serve_is_not_used(compose, tmp_path):
    _run(compose, tmp_path, "a", "n_prompts=30", "layers=[1]")
    _run(compose, tmp_path, "b", "n_prompts=30", "layers=[1]", "corpus.seed=1")  # other prompts
    _run(compose, tmp_path, "c", "n_prompts=40", "layers=[1]")  # more prompts than any store holds
    assert len(list((tmp_path / "stores").iterdir())) == 3
    assert all(json.loads((tmp_path / r / "store.json").read_text())["served"] == "exact" for r in "abc")


def test_open_run_store_names_what_it_cannot_open(tmp_path):
    with pytest.raises(CollideError, match="neither a collide store"):
        open_run_store(tmp_path)
    (tmp_path / "store.json").write_text('{"path": "/nowhere", "n_prompts": 3}')
    with pytest.raises(CollideError, match="holds no manifest.json"):
        open_run_store(tmp_path)
    (tmp_path / "store.json").write_text('{"path": ')
    with pytest.raises(CollideError, match="rerun the run's own"):
        open_run_store(tmp_path)


def test_store_identity_keeps_what_determines_the_states(compose):
    base = store_identity(compose(["model=tiny-random"]))
    assert store_identity(compose(["model=tiny-random", "model.device=cpu", "threshold=1e-3",
                                   "search.backend=faiss", "report.figures=false"])) == base
    for override in ("model.dtype=bf16", "model.final_norm=pre", "store.positions=all", "store.dtype=fp16",
                     "n_prompts=999", "layers=[1]", "corpus.max_tokens=16", "model.seed=3"):
        assert store_identity(compose(["model=tiny-random", override])) != base, override
    # store.dtype=auto means the compute dtype: the same states as asking for it
    assert store_identity(compose(["model=tiny-random", "store.dtype=fp32"])) == base
    cfg = compose(["model=tiny-random", "n_prompts=77"])
    assert store_location(cfg, store_identity(cfg)).name == f"tiny-random-stdlib-docs-n77-{identity_hash(store_identity(cfg))}"


def test_a_path_in_an_override_does_not_nest_run_directories(tmp_path):
    data = tmp_path / "data" / "docs.txt"
    data.parent.mkdir()
    data.write_text("\n\n".join(chr(ord("a") + i) * 60 for i in range(20)))
    proc = subprocess.run([sys.executable, "-m", "collide", "model=tiny-random", "corpus=files",
                           f"corpus.data_files=[{data}]", "n_prompts=20", "layers=[1]", *QUIET],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs" / "tiny-random-files-n20").iterdir()]
    assert len(runs) == 1 and (runs[0] / "report.json").is_file()
    assert str(data).replace("/", "%2F") in runs[0].name


# --------------------------------------------------------------------------- the collide command line


def test_every_subcommand_composes_and_a_range_is_a_range_everywhere():
    assert cli.compose("search", ["/some/store", "layers=1:3"]).layers == "1:3"
    exhaustive = cli.compose("exhaustive", ["/some/run", "layers=1:3"])
    assert exhaustive.run_dir == "/some/run" and parse_layers(exhaustive.layers, 4) == [1, 2, 3]
    assert cli.compose("verify", ["a", "b"]).stores == ["a", "b"]
    compare = cli.compose("compare", ["r1", "r2", "depth_axis=absolute", "out=x"])
    assert (compare.runs, compare.depth_axis, compare.out) == (["r1", "r2"], "absolute", "x")
    # a path is data, not override grammar: spaces, colons and '=' in a positional path stay as they are
    assert cli.compose("search", ["/a b/c:d"]).store == "/a b/c:d"


@pytest.mark.parametrize("argv,named", [(["search", "/s", "threshold=abc"], "threshold"),
                                        (["search", "/s", "serach.k=3"], "serach"),
                                        (["search", "/s", "search.backend=annoy"], "annoy"),
                                        (["search"], "STORE"), (["search", "/a", "/b"], "STORE"),
                                        (["compare"], "RUNS"), (["bogus"], "bogus"),
                                        (["search", "/s", "--bogus"], "--bogus")])
def test_bad_command_lines_are_one_line(capsys, argv, named):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("collide: error:") and named in err[0]


def test_help_lists_the_keys_and_is_never_a_path(capsys):
    for name in ("search", "verify", "compare", "exhaustive"):
        assert cli.main([name, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: collide {name}")
    assert cli.main(["search", "--help"]) == 0
    out = capsys.readouterr().out
    assert "threshold=1e-06  # L2 distance (not squared)" in out and "search.backend=auto  [auto | torch | faiss]" in out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)


def test_module_forms_are_the_same_commands(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "collide.search", "--help"], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: collide search STORE")
    proc = subprocess.run([sys.executable, "-m", "collide", "verify", str(tmp_path / "none")], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("does not exist; pass store directories (e.g. under "
                                                                  "runs/stores/)")


def test_collide_run_help_names_the_app(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "collide", "run", "--help"], capture_output=True, text=True,
                          env=ENV, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("collide run:") and "__main__" not in proc.stdout


def test_explicit_store_path_is_used_as_given(compose, tmp_path):
    report = _run(compose, tmp_path, "r", "n_prompts=20", "layers=[1]", f"store.path={tmp_path / 'mine'}")
    assert report["n_prompts"] == 20 and open_store(tmp_path / "mine").complete
    assert not (tmp_path / "stores").exists()


def test_cli_errors_are_collide_errors():
    with pytest.raises(CollideError, match="STORE"):
        cli.compose("search", [])
