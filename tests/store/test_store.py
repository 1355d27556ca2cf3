"""The Parquet store without a model: round trips, block streaming, safety, verify."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

import collide.store.writer as store_mod
from collide import cli
from tests.support.stores import rewrite_listed_file
from collide.errors import CollideError
from collide.store import StoreWriter, open_store, prompt_table
from collide.store.verify import verify_store

ROOT = Path(__file__).resolve().parents[2]
D = 8


def header(layers=(0, 3), keep_text=True, n_prompts=25, shard_rows=10, dtype="fp32", positions="last") -> dict:
    return dict(model=dict(name="fake"), dtype=dtype, positions=positions, final_norm="post", layer_convention="test",
                layers=list(layers), d=D, n_layers=3, n_prompts=n_prompts, keep_text=keep_text, shard_rows=shard_rows,
                batch_tokens=64, max_batch_size=4)


def shard_data(first: int, rows: int, layers=(0, 3), keep_text=True, seed=0, positions=False):
    """(prompts table, {layer: (rows, d)} last-token states[, {layer: (tokens, d)} every position]):
    with ``positions`` the last position of each prompt is its last-token state, as extraction writes."""
    rng = np.random.default_rng(seed + first)
    tokens = [rng.integers(0, 300, size=rng.integers(1, 9)).tolist() for _ in range(rows)]
    table = prompt_table(first, tokens, [f"doc:{first + i}" for i in range(rows)],
                         [f"text {first + i}" for i in range(rows)] if keep_text else None)
    states = {k: rng.standard_normal((rows, D)).astype(np.float32) * 10.0 ** k for k in layers}
    if not positions:
        return table, states
    ends = np.cumsum([len(t) for t in tokens]) - 1
    every = {k: rng.standard_normal((ends[-1] + 1, D)).astype(np.float32) * 10.0 ** k for k in layers}
    for k in layers:
        every[k][ends] = states[k]
    return table, states, every


def write_store(path, sizes=(10, 10, 5), layers=(0, 3), keep_text=True, identity=None, finish=True, dtype="fp32",
                positions="last"):
    """A store of shards of the given sizes; returns the states written, {layer: (n, d)}, and with
    positions="all" also {layer: [float32 (n_tokens, d) per prompt]}."""
    writer = StoreWriter.open(path, identity or {"seed": 1}, header(layers, keep_text, sum(sizes), dtype=dtype,
                                                                    positions=positions))
    written, every = {k: [] for k in layers}, {k: [] for k in layers}
    first = 0
    for rows in sizes:
        table, states, *more = shard_data(first, rows, layers, keep_text, positions=positions == "all")
        writer.commit_shard(table, states, {"n_duplicates": first // 10}, *more)
        lengths = table.column("n_tokens").to_numpy()
        for k in layers:
            written[k].append(states[k])
            if more:
                every[k] += np.split(more[0][k], np.cumsum(lengths)[:-1])
        first += rows
    if finish:
        writer.finish()
    written = {k: np.concatenate(v) for k, v in written.items()}
    return (written, every) if positions == "all" else written


def test_layer_round_trip_is_exact_float32(tmp_path):
    written = write_store(tmp_path / "s")
    store = open_store(tmp_path / "s")
    assert (store.layers, store.d, store.n_rows, store.complete) == ([0, 3], D, 25, True)
    for k in store.layers:
        ids, states = store.layer(k)
        assert ids.dtype == np.int64 and states.dtype == np.float32 and states.shape == (25, D)
        assert np.array_equal(ids, np.arange(25))
        assert np.array_equal(states.view(np.uint32), written[k].view(np.uint32))
    assert store.manifest["counts"] == {"n_prompts": 25, "n_duplicates": 2, "n_tokens": int(
        store.prompts(["n_tokens"]).column("n_tokens").to_numpy().sum())}


def test_single_shard_layer_is_zero_copy_and_read_only(tmp_path):
    written = write_store(tmp_path / "s", sizes=(7,))
    ids, states = open_store(tmp_path / "s").layer(3)
    assert np.array_equal(states, written[3])
    assert not states.flags.writeable  # a view of the Arrow buffer, not a copy


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5), rows=st.integers(1, 30))
def test_iter_blocks_cover_all_rows_in_order(tmp_path_factory, sizes, rows):
    path = tmp_path_factory.mktemp("blocks") / "s"
    written = write_store(path, sizes=tuple(sizes))
    blocks = list(open_store(path).iter_blocks(0, rows))
    n = sum(sizes)
    assert [len(ids) for ids, _ in blocks] == [rows] * (n // rows) + ([n % rows] if n % rows else [])
    assert np.array_equal(np.concatenate([ids for ids, _ in blocks]), np.arange(n))
    assert np.array_equal(np.concatenate([s for _, s in blocks]), written[0])
    assert all(s.dtype == np.float32 and s.shape[1] == D for _, s in blocks)


def test_parquet_schema_and_encoding(tmp_path):
    write_store(tmp_path / "s", sizes=(6,))
    layer_file = tmp_path / "s" / "layer=3" / "part-00000.parquet"
    schema = pq.read_schema(layer_file)
    assert schema.field("prompt_id").type == pa.int64()
    assert schema.field("state").type == pa.list_(pa.float32(), D)
    column = pq.ParquetFile(layer_file).metadata.row_group(0).column(1)
    assert column.compression == "UNCOMPRESSED"
    assert not any("DICTIONARY" in e for e in column.encodings)
    prompts = pq.read_schema(tmp_path / "s" / "prompts" / "part-00000.parquet")
    assert [(f.name, f.type) for f in prompts] == [("prompt_id", pa.int64()), ("token_ids", pa.list_(pa.int32())),
                                                   ("n_tokens", pa.int32()), ("source", pa.string()),
                                                   ("text", pa.string())]


def test_prompts_and_texts(tmp_path):
    write_store(tmp_path / "s")
    store = open_store(tmp_path / "s")
    table = store.prompts()
    assert table.column("prompt_id").to_pylist() == list(range(25))
    assert table.column("source").to_pylist()[12] == "doc:12"
    assert store.prompts(["prompt_id", "n_tokens"]).column_names == ["prompt_id", "n_tokens"]
    assert store.texts([3, 24, 11]) == {3: "text 3", 24: "text 24", 11: "text 11"}
    with pytest.raises(CollideError, match="prompt_id 25 is not in the store"):
        store.texts([25])


def test_keep_text_false_stores_no_text(tmp_path):
    write_store(tmp_path / "s", keep_text=False)
    store = open_store(tmp_path / "s")
    assert "text" not in store.prompts().column_names
    assert store.texts([0, 1]) == {}
    with pytest.raises(CollideError, match="keep_text=false"):
        store.prompts(["text"])


def test_nonfinite_rows_are_counted_per_layer_and_stored_as_is(tmp_path):
    writer = StoreWriter.open(tmp_path / "s", {}, header(n_prompts=4))
    table, states = shard_data(0, 4)
    states[3][1, 2] = np.nan
    states[3][2, 0] = np.inf
    states[0][2, 5] = -np.inf
    writer.commit_shard(table, states)
    store = writer.finish()
    assert store.manifest["nonfinite_rows"] == {"0": 1, "3": 2}
    assert store.manifest["shards"][0]["nonfinite_rows"] == {"0": 1, "3": 2}
    _, got = store.layer(3)
    assert np.isnan(got[1, 2]) and got[2, 0] == np.inf and np.isfinite(got[[0, 3]]).all()


def test_identity_mismatch_names_the_key_and_both_values(tmp_path):
    identity = {"model": {"name": "tiny", "dtype": "fp32"}, "corpus": {"seed": 0}, "n_prompts": 25}
    write_store(tmp_path / "s", identity=identity, finish=False)
    changed = {"model": {"name": "tiny", "dtype": "bf16"}, "corpus": {"seed": 0}, "n_prompts": 25}
    with pytest.raises(CollideError) as err:
        StoreWriter.open(tmp_path / "s", changed, header(n_prompts=25))
    message = str(err.value)
    assert "model.dtype" in message and "'fp32'" in message and "'bf16'" in message
    assert "new store.path or delete the store" in message and "\n" not in message
    with pytest.raises(CollideError, match="layers=\\[0, 3\\], this run has \\[0, 2\\]"):
        StoreWriter.open(tmp_path / "s", identity, header(layers=(0, 2), n_prompts=25))
    with pytest.raises(CollideError, match="keep_text"):
        StoreWriter.open(tmp_path / "s", identity, header(keep_text=False, n_prompts=25))


def test_resume_keeps_the_stored_batching_and_removes_strays(tmp_path):
    write_store(tmp_path / "s", sizes=(10,), finish=False)
    stray = tmp_path / "s" / "layer=3" / "part-00001.parquet"
    stray.write_bytes(b"half a shard")
    (tmp_path / "s" / "prompts" / "part-00001.parquet.tmp").write_bytes(b"x")
    writer = StoreWriter.open(tmp_path / "s", {"seed": 1}, dict(header(n_prompts=10), shard_rows=99, batch_tokens=7))
    assert (writer.batching("shard_rows"), writer.batching("batch_tokens"), writer.n_rows) == (10, 64, 10)
    assert not stray.exists() and not (tmp_path / "s" / "prompts" / "part-00001.parquet.tmp").exists()


def test_verify_ok_then_names_a_corrupted_and_a_truncated_file(tmp_path, capsys):
    write_store(tmp_path / "s")
    assert verify_store(tmp_path / "s") == []
    corrupted = tmp_path / "s" / "layer=3" / "part-00001.parquet"
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupted.write_bytes(bytes(data))
    truncated = tmp_path / "s" / "prompts" / "part-00002.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    problems = verify_store(tmp_path / "s")
    assert len(problems) == 2
    assert str(corrupted) in problems[0] and "sha256 mismatch" in problems[0]
    assert str(truncated) in problems[1] and "truncated" in problems[1]
    store = open_store(tmp_path / "s")  # readers refuse the damaged files too, naming them
    with pytest.raises(CollideError, match=str(corrupted)):
        store.layer(3)
    with pytest.raises(CollideError, match=str(truncated)):
        store.texts([store.shards[2]["first_prompt_id"]])
    assert cli.main(["verify", str(tmp_path / "s")]) == 1
    printed = capsys.readouterr().out
    assert str(corrupted) in printed and str(truncated) in printed and "FAILED" in printed


def test_verify_cli_ok_and_checks_ids_against_the_prompts_file(tmp_path, capsys):
    write_store(tmp_path / "s")
    assert cli.main(["verify", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("OK ") and "25 prompts" in printed
    # A layer file rewritten with other ids and its manifest entry updated: the checksum passes,
    # the id check does not.
    rel = "layer=0/part-00001.parquet"
    table = pq.read_table(tmp_path / "s" / rel)
    table = table.set_column(0, "prompt_id", pa.array(np.arange(100, 110, dtype=np.int64)))
    rewrite_listed_file(tmp_path / "s", 1, rel, table)
    problems = verify_store(tmp_path / "s")
    assert len(problems) == 1 and rel in problems[0] and "differ" in problems[0]


def test_enospc_gives_one_clear_line_and_keeps_earlier_shards(tmp_path, monkeypatch):
    writer = StoreWriter.open(tmp_path / "s", {}, header(n_prompts=30))
    for first in (0, 10):
        writer.commit_shard(*shard_data(first, 10))
    real = store_mod.atomic_write

    def full_disk(path, write):
        if path.name == "part-00002.parquet" and path.parent.name == "layer=3":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)
    monkeypatch.setattr(store_mod, "atomic_write", full_disk)
    with pytest.raises(CollideError) as err:
        writer.commit_shard(*shard_data(20, 10))
    message = str(err.value)
    assert "\n" not in message and "no space left" in message and "layer=3/part-00002.parquet" in message
    assert "rerun the same command" in message
    assert verify_store(tmp_path / "s") == []
    assert open_store(tmp_path / "s").n_rows == 20
    assert sorted(p.name for p in (tmp_path / "s" / "prompts").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    monkeypatch.setattr(store_mod, "atomic_write", real)  # disk freed: a new writer resumes
    writer.close()
    writer = StoreWriter.open(tmp_path / "s", {}, header(n_prompts=30))
    writer.commit_shard(*shard_data(20, 10))
    assert writer.finish().n_rows == 30 and verify_store(tmp_path / "s") == []


def test_unwritable_store_path_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CollideError) as err:
        StoreWriter.open(blocker / "store", {}, header())
    assert str(blocker / "store") in str(err.value) and "store.path" in str(err.value) and "\n" not in str(err.value)

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(CollideError, match=r"cannot write .*/ro \(Permission denied\); make it writable or set "
                                           r"store.path to a writable directory$"):
        StoreWriter.open(tmp_path / "ro", {}, header())


def test_open_store_errors_name_the_path(tmp_path):
    with pytest.raises(CollideError, match="is not a collide store"):
        open_store(tmp_path)
    write_store(tmp_path / "run" / "store", sizes=(3,))
    with pytest.raises(CollideError, match="a run directory keeps its store in"):
        open_store(tmp_path / "run")
    with pytest.raises(CollideError, match=r"layer 5 is not in the store .* holds layers \[0, 3\]"):
        open_store(tmp_path / "run" / "store").layer(5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(CollideError, match="not empty and holds no manifest.json"):
        StoreWriter.open(tmp_path / "full", {}, header())


def test_reader_needs_neither_torch_nor_transformers():
    code = ("import sys, collide.store, collide.store.verify; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docs_reading_snippet_runs_with_pyarrow_only(tmp_path):
    """The pyarrow-only recipe in docs/store-format.md reads what the store wrote."""
    written = write_store(tmp_path / "s")
    doc = (ROOT / "docs" / "store-format.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    namespace = {"STORE": str(tmp_path / "s"), "K": 3}
    exec(compile(snippet, "store-format.md", "exec"), namespace)
    assert np.array_equal(namespace["ids"], np.arange(25))
    assert np.array_equal(namespace["states"], written[3])
