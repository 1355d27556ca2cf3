"""search_store (out of core, prompt ids) and the ``python -m collide.search`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collide.config import SearchConfig
from collide.search import min_pairwise, search_store
from collide.cli import main
from collide.store import StoreWriter, open_store, prompt_table

ROOT = Path(__file__).resolve().parents[2]
D = 16


def layer_states(n: int, seed: int) -> np.ndarray:
    """Rows with a duplicate pair, a near pair (3e-7), a NaN row and an Inf row."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, D)) * 30 + 500).astype(np.float32)
    x[61] = x[4]
    x[33] = x[70]
    x[33, 2], x[70, 2] = 0.0, np.float32(3e-7)
    x[12, 5], x[50, 0] = np.nan, np.inf
    return x


def write_store(path: Path, sizes=(30, 30, 17), layers=(0, 2)) -> dict[int, np.ndarray]:
    n = sum(sizes)
    header = dict(model=dict(name="fake"), dtype="fp32", final_norm="post", layer_convention="test",
                  layers=list(layers), d=D, n_layers=2, n_prompts=n, keep_text=False, shard_rows=sizes[0],
                  batch_tokens=64, max_batch_size=4)
    writer = StoreWriter.open(path, {"seed": 1}, header)
    full = {k: layer_states(n, seed=k) for k in layers}
    first = 0
    for rows in sizes:
        table = prompt_table(first, [[first + i] for i in range(rows)], [f"doc:{first + i}" for i in range(rows)])
        writer.commit_shard(table, {k: full[k][first:first + rows] for k in layers})
        first += rows
    writer.finish()
    return full


class StreamOnly:
    """A store that only streams: reading a whole layer fails, block sizes are recorded."""

    def __init__(self, states: np.ndarray, ids: np.ndarray):
        self.states, self.ids, self.d, self.layers, self.n_rows = states, ids, states.shape[1], [7], len(ids)
        self.largest_block = self.blocks_read = 0

    def layer(self, k):
        raise AssertionError("the torch engine must not load a layer whole")

    def iter_blocks(self, k, rows):
        for s in range(0, self.n_rows, rows):
            self.largest_block = max(self.largest_block, len(self.ids[s:s + rows]))
            self.blocks_read += 1
            yield self.ids[s:s + rows].copy(), self.states[s:s + rows].copy()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "store"
    return path, write_store(path)


def test_out_of_core_equals_in_memory_bit_for_bit():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((230, 24)) * 50 + 300).astype(np.float32)
    x[[15, 99, 180]] = x[140]
    x[200] = x[7]
    x[201, 3], x[9, 0] = np.nan, -np.inf
    ids = np.arange(1000, 1230, dtype=np.int64)
    fake = StreamOnly(x, ids)
    cfg = SearchConfig(block_rows=32, progress=False)
    lr = search_store(fake, 7, 1e-6, cfg)
    mem = min_pairwise(x, 1e-6, "torch", block_rows=32)
    assert fake.largest_block == 32  # 8 blocks streamed, never the whole layer
    assert fake.blocks_read == 8 + 8 + 8 * 7 // 2  # scan pass, each block J once, blocks I < J again
    r = lr.result
    assert r.certified and mem.certified
    assert (r.distance, r.pair, r.collisions, r.invalid_rows) == (mem.distance, mem.pair, mem.collisions,
                                                                  mem.invalid_rows)
    assert r.collisions.tolist() == [(7, 200, 0.0), (15, 99, 0.0), (15, 140, 0.0), (15, 180, 0.0), (99, 140, 0.0),
                            (99, 180, 0.0), (140, 180, 0.0)]
    assert r.invalid_rows == [9, 201]
    assert np.array_equal(np.isnan(r.nn_distance), np.isnan(mem.nn_distance))
    assert lr.closest_pair_ids() == (1007, 1200)
    np.testing.assert_array_equal(lr.prompt_ids, ids)


def test_search_store_reports_prompt_ids_and_a_collision_table(store):
    path, full = store
    st = open_store(path)
    for backend in ("torch", "faiss"):
        lr = search_store(st, 2, 1e-6, SearchConfig(backend=backend, block_rows=20, progress=False))
        mem = min_pairwise(full[2], 1e-6, backend)
        assert (lr.result.distance, lr.result.pair, lr.result.collisions) == (mem.distance, mem.pair, mem.collisions)
        assert lr.result.backend == backend and lr.result.certified
        assert lr.result.invalid_rows == [12, 50]
        table = lr.collision_table()
        assert table.schema == pa.schema([("a", pa.int64()), ("b", pa.int64()), ("distance", pa.float64())])
        assert table.column("a").to_pylist() == [4, 33] and table.column("b").to_pylist() == [61, 70]
        assert table.column("distance").to_pylist() == [0.0, float(np.float32(3e-7))]
        assert lr.closest_pair_ids() == (4, 61)


def test_cli_searches_every_layer_and_writes_json(store, tmp_path, capsys):
    path, full = store
    out = tmp_path / "s.json"
    assert main(["search", str(path), "layers=[0,2]", "threshold=1e-6", "search.block_rows=25", "search.progress=false",
                 f"out={out}", "max_listed=1"]) == 0
    summary = json.loads(out.read_text())
    assert [e["layer"] for e in summary["layers"]] == [0, 2]
    for e in summary["layers"]:
        assert e["certified"] and e["n_vectors"] == 77 and e["n_pairs"] == 75 * 74 // 2
        assert e["closest_pair"] == [4, 61] and e["min_distance"] == 0.0
        assert e["n_collisions"] == 2 and e["collisions"] == [{"a": 4, "b": 61, "distance": 0.0}]
        assert e["invalid_rows"] == [12, 50]
        listed = pq.read_table(e["collisions_file"])  # max_listed=1 caps the JSON, never the Parquet list
        assert e["collisions_file"] == str(tmp_path / "s-collisions" / f"layer={e['layer']}.parquet")
        assert listed.column("a").to_pylist() == [4, 33] and listed.column("b").to_pylist() == [61, 70]
    assert summary["search"]["block_rows"] == 25
    printed = capsys.readouterr().out
    assert "4 / 61" in printed and f"written {out}" in printed


def test_cli_default_output_in_the_store_and_layer_range(store, capsys):
    path, _ = store
    assert main(["search", str(path), "layers=1:2", "search.progress=false"]) == 0
    [found] = (path / "searches").glob("*/search.json")  # searches/<settings hash>/
    summary = json.loads(found.read_text())
    assert [e["layer"] for e in summary["layers"]] == [2]
    assert summary["layers"][0]["collisions_file"] == str(found.parent / "collisions" / "layer=2.parquet")
    assert not (path.parent / "search.json").exists()


def test_cli_errors_are_one_line_with_exit_2(store, capsys):
    path, _ = store
    assert main(["search", str(path), "search.blok_rows=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("collide: error:") and "blok_rows" in err and "\n" not in err
    assert main(["search", str(path), "layers=[1]"]) == 2
    assert "holds layers [0, 2]" in capsys.readouterr().err
    assert main(["search", str(path.parent / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_as_a_module_exits_2_on_a_typo(store):
    path, _ = store
    proc = subprocess.run([sys.executable, "-m", "collide.search", str(path), "treshold=1e-3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "treshold" in lines[0] and lines[0].startswith("collide: error:")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_states_stored_as_bf16_or_fp16_are_searched_exactly(tmp_path, dtype):
    """The store widens bf16/fp16 to fp32 exactly: the search equals min_pairwise on the narrow values."""
    torch = pytest.importorskip("torch")
    narrow = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x = torch.from_numpy(layer_states(80, seed=5)).to(narrow)  # the NaN and Inf rows stay NaN and Inf
    header = dict(model=dict(name="fake"), dtype=dtype, final_norm="post", layer_convention="test", layers=[3],
                  d=D, n_layers=3, n_prompts=80, keep_text=False, shard_rows=32, batch_tokens=64, max_batch_size=4)
    writer = StoreWriter.open(tmp_path / "store", {"seed": 5}, header)
    for first in range(0, 80, 32):
        rows = min(32, 80 - first)
        table = prompt_table(first, [[first + i] for i in range(rows)], [f"doc:{first + i}" for i in range(rows)])
        writer.commit_shard(table, {3: x[first:first + rows].float().numpy()})
    writer.finish()
    st = open_store(tmp_path / "store")
    assert st.dtype == dtype
    mem = min_pairwise(x, 1e-6, "torch", block_rows=7)
    assert [c[:2] for c in mem.collisions.tolist()] == [(4, 61), (33, 70)] and mem.invalid_rows == [12, 50]
    for backend in ("torch", "faiss"):
        r = search_store(st, 3, 1e-6, SearchConfig(backend=backend, block_rows=7, progress=False)).result
        assert (r.distance, r.pair, r.collisions, r.invalid_rows) == (mem.distance, mem.pair, mem.collisions,
                                                                      mem.invalid_rows)
        np.testing.assert_array_equal(r.nn_distance, mem.nn_distance)
