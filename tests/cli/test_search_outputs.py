"""Where `collide search` writes: a folder of its own per store and settings, so that searching one store never
replaces another's results, and a failed search leaves the files of the previous one (or none), never a file
that its JSON does not list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from collide import cli
from collide.config import ExtractConfig, StoreConfig
from collide.extract import extract_to_store

from tests.conftest import tiny_identity, tiny_prompts

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def stores(tiny_llama, tmp_path_factory):
    """Two complete stores side by side in one folder (as under runs/stores/): a of 12 prompts, b of 9."""
    parent = tmp_path_factory.mktemp("search-outputs") / "stores"
    for name, n in (("a", 12), ("b", 9)):
        extract_to_store(tiny_llama, tiny_prompts(n, seed=n), LAYERS, parent / name, n, tiny_identity(n),
                         StoreConfig(shard_rows=8), ExtractConfig(batch_tokens=512, progress=False))
    return parent


def search(*args) -> int:
    return cli.main(["search", *map(str, args), "search.progress=false"])


def files(root: Path) -> dict:
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def summaries(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / "searches").glob("*/search.json"))]


def test_searching_two_stores_of_one_folder_keeps_both_results(stores, tmp_path, capsys):
    work = tmp_path / "stores"
    shutil.copytree(stores, work)
    assert search(work / "a") == 0 and search(work / "b") == 0
    assert sorted(p.name for p in work.iterdir()) == ["a", "b"]  # nothing written beside the stores
    for name, n in (("a", 12), ("b", 9)):
        [summary] = summaries(work / name)
        assert summary["store"] == str(work / name)
        assert [(e["layer"], e["n_vectors"], e["n_pairs"]) for e in summary["layers"]] == [
            (k, n, n * (n - 1) // 2) for k in LAYERS]
        folder = next((work / name / "searches").iterdir())
        assert sorted(p.name for p in (folder / "collisions").iterdir()) == ["layer=1.parquet", "layer=3.parquet"]
        for entry in summary["layers"]:  # every file the JSON lists is there, in this store's own folder
            assert Path(entry["collisions_file"]).parent == folder / "collisions"
            assert pq.read_table(entry["collisions_file"]).num_rows == entry["n_collisions"]
    # other settings: a folder of their own beside the first; the same settings again: the same folder
    assert search(work / "a", "threshold=1e-3", "layers=[3]") == 0 and search(work / "a") == 0
    assert sorted((s["threshold"], [e["layer"] for e in s["layers"]]) for s in summaries(work / "a")) == [
        (1e-6, LAYERS), (1e-3, [3])]


def test_a_failed_search_leaves_the_previous_files(stores, tmp_path, capsys):
    work = tmp_path / "stores"
    shutil.copytree(stores, work)
    assert search(work / "a", f"out={tmp_path / 's.json'}") == 0
    before = files(tmp_path)
    part = work / "b" / "layer=3" / "part-00000.parquet"  # layer 1 is searched (and its collisions written) first
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    before[str(part.relative_to(tmp_path))] = part.read_bytes()
    capsys.readouterr()
    assert search(work / "b", f"out={tmp_path / 's.json'}") == 2
    assert str(part) in capsys.readouterr().err
    assert files(tmp_path) == before  # s.json still lists store a's layers, whose files are still there
    listed = json.loads((tmp_path / "s.json").read_text())
    assert sorted(Path(e["collisions_file"]).name for e in listed["layers"]) == sorted(
        p.name for p in (tmp_path / "s-collisions").iterdir())
    assert search(work / "b") == 2  # the default folder: none left behind
    assert not (work / "b" / "searches").exists()
