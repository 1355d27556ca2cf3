"""Store features without a model: storage dtypes, every-position shards, views, the ecosystem
readers, and the examples of docs/store-format.md run against a store built here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from collide.errors import CollideError
from collide.store import StoreWriter, decode_states, encode_states, open_store
from collide.store.verify import verify_store
from test_store import D, header, shard_data, write_store
from tests.support.stores import rewrite_listed_file

ROOT = Path(__file__).resolve().parents[2]


def edge_values() -> np.ndarray:
    """float32 values that exercise bf16 rounding: ties both ways, carries into the exponent,
    overflow to Inf, subnormals, signed zeros, Inf and NaN."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x7F7F8000, 0x00000001,
                     0x80008000, 0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
                     0x7F800001], np.uint32)
    rng = np.random.default_rng(0)
    return np.concatenate([bits.view(np.float32), rng.standard_normal(4000).astype(np.float32) * 1e3])


def test_bf16_encoding_equals_torch_rounding_and_decodes_exactly():
    x = edge_values()
    bits = encode_states(x.reshape(-1, 1), "bf16").reshape(-1)
    reference = torch.from_numpy(x).to(torch.bfloat16)
    finite = np.isfinite(x) | np.isinf(x)
    assert np.array_equal(bits[finite], reference.view(torch.int16).numpy().view(np.uint16)[finite])
    back = decode_states(bits, "bf16")
    assert np.array_equal(np.isnan(back), np.isnan(x))  # NaN stays NaN (never Inf)
    assert np.array_equal(back[finite], reference.float().numpy()[finite])
    assert np.array_equal(decode_states(encode_states(back.reshape(-1, 1), "bf16"), "bf16").reshape(-1)[finite],
                          back[finite])  # bf16 values round-trip bitwise


@pytest.mark.parametrize("dtype,value_type,narrow", [("bf16", pa.uint16(), lambda x: torch.from_numpy(x).to(
    torch.bfloat16).float().numpy()), ("fp16", pa.float16(), lambda x: x.astype(np.float16).astype(np.float32))])
def test_narrow_dtypes_store_tagged_values_and_read_as_exact_float32(tmp_path, dtype, value_type, narrow):
    written, every = write_store(tmp_path / "s", dtype=dtype, positions="all")
    store = open_store(tmp_path / "s")
    assert (store.dtype, store.manifest["dtype"], store.manifest["format_version"]) == (dtype, dtype, 2)
    field = pq.read_schema(tmp_path / "s" / "layer=3" / "part-00001.parquet").field("state")
    assert field.type == pa.list_(value_type, D) and field.metadata == {b"collide.dtype": dtype.encode()}
    for k in store.layers:
        ids, x = store.layer(k)
        assert x.dtype == np.float32 and np.array_equal(x, narrow(written[k]))
        assert np.array_equal(np.concatenate([b for _, b in store.iter_blocks(k, 7)]), x)
        for pid, got in store.position_states(k):
            assert np.array_equal(got, narrow(every[k][pid])) and np.array_equal(got[-1], x[pid])
    assert verify_store(tmp_path / "s") == []


def test_every_position_shards_are_listed_checked_and_verified(tmp_path):
    written, every = write_store(tmp_path / "s", positions="all")
    store = open_store(tmp_path / "s")
    assert store.positions == "all"
    rel = "positions/layer=3/part-00001.parquet"
    assert rel in store.shards[1]["files"]
    table = pq.read_table(tmp_path / "s" / rel)
    assert table.schema.names == ["prompt_id", "position", "state"]
    assert table.schema.field("position").type == pa.int32()
    lengths = store.prompts(["n_tokens"]).column("n_tokens").to_numpy()
    assert table.column("prompt_id").to_numpy().tolist() == np.repeat(np.arange(10, 20), lengths[10:20]).tolist()
    got = dict(store.position_states(0, [24, 3]))
    assert sorted(got) == [3, 24] and np.array_equal(got[3], every[0][3]) and got[3].flags.writeable
    with pytest.raises(CollideError, match="prompt_id 25 is not in the store"):
        list(store.position_states(0, [25]))
    # the positions are checked: a rewritten file (manifest updated) with positions out of order
    table = table.set_column(1, "position", pa.array(table.column("position").to_numpy()[::-1]))
    rewrite_listed_file(tmp_path / "s", 1, rel, table)
    problems = verify_store(tmp_path / "s")
    assert len(problems) == 1 and rel in problems[0] and "positions 0..n_tokens-1" in problems[0]


def test_positions_stray_files_are_removed_on_resume_and_flagged_by_verify(tmp_path):
    write_store(tmp_path / "s", sizes=(10,), positions="all", finish=False)
    stray = tmp_path / "s" / "positions" / "layer=0" / "part-00001.parquet"
    stray.write_bytes(b"half a shard")
    writer = StoreWriter.open(tmp_path / "s", {"seed": 1}, header(n_prompts=10, positions="all"))
    assert not stray.exists()
    writer.finish()
    stray.write_bytes(b"x")
    assert verify_store(tmp_path / "s") == [f"{stray}: not listed in the manifest (stray file)"]


def test_writer_refuses_positions_that_do_not_match_the_store(tmp_path):
    writer = StoreWriter.open(tmp_path / "s", {}, header(positions="all"))
    table, states, every = shard_data(0, 4, positions=True)
    with pytest.raises(ValueError, match="takes every position"):
        writer.commit_shard(table, states)
    writer.close()
    with pytest.raises(CollideError, match="made with positions='all', this run has 'last'"):
        StoreWriter.open(tmp_path / "s", {}, header())
    with pytest.raises(CollideError, match="made with dtype='fp32', this run has 'bf16'"):
        StoreWriter.open(tmp_path / "s", {}, header(positions="all", dtype="bf16"))


def test_version_1_manifest_reads_as_fp32_last(tmp_path):
    written = write_store(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest.update(format_version=1, dtype="bf16")  # v1's dtype was the compute dtype
    del manifest["positions"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    store = open_store(tmp_path / "s")
    assert (store.dtype, store.positions) == ("fp32", "last")
    assert np.array_equal(store.layer(3)[1], written[3]) and verify_store(tmp_path / "s") == []


def test_select_and_select_range_are_views_every_reader_honours(tmp_path):
    written = write_store(tmp_path / "s")  # shards of 10, 10, 5
    store = open_store(tmp_path / "s")
    view = store.select(13)
    assert (view.n_rows, view.first_id, view.stop_id, store.n_rows) == (13, 0, 13, 25)
    ids, x = view.layer(3)
    assert np.array_equal(ids, np.arange(13)) and np.array_equal(x, written[3][:13])
    part = store.select_range(7, 23)
    assert np.array_equal(part.layer(0)[1], written[0][7:23])
    blocks = list(part.iter_blocks(0, 4))
    assert [len(b) for b, _ in blocks] == [4, 4, 4, 4] and np.array_equal(np.concatenate([b for b, _ in blocks]),
                                                                           np.arange(7, 23))
    assert part.prompts(["prompt_id"]).column(0).to_pylist() == list(range(7, 23))
    assert part.texts([7, 22]) == {7: "text 7", 22: "text 22"}
    assert np.array_equal(part.select(3).layer(3)[0], [7, 8, 9])
    for bad in (lambda: part.texts([6]), lambda: part.states(0, [23]), lambda: store.select(26),
                lambda: part.select_range(5, 9)):
        with pytest.raises(CollideError, match="not in|not within"):
            bad()


def test_states_by_prompt_id_in_the_order_asked(tmp_path):
    written = write_store(tmp_path / "s", dtype="bf16")
    store = open_store(tmp_path / "s")
    ids = [24, 0, 11, 11, 3]
    assert np.array_equal(store.states(3, ids), store.layer(3)[1][ids])
    assert store.states(0, []).shape == (0, D)
    assert np.abs(store.states(0, ids) - written[0][ids]).max() <= 2 ** -8 * np.abs(written[0][ids]).max()


def test_pyarrow_dataset_hf_dataset_and_torch_dataset(tmp_path):
    written = write_store(tmp_path / "s")
    store = open_store(tmp_path / "s")
    table = store.dataset(3).to_table()
    assert table.column("prompt_id").to_pylist() == list(range(25))
    assert store.select(12).dataset(0).count_rows() == 12
    hf = store.hf_dataset(3)
    assert hf.column_names == ["prompt_id", "token_ids", "text", "state"] and len(hf) == 25
    assert np.array_equal(np.array(hf[17]["state"], np.float32), written[3][17]) and hf[17]["text"] == "text 17"
    assert np.array_equal(hf.with_format("numpy")["state"], written[3])
    part = store.select_range(8, 21).hf_dataset(0)
    assert len(part) == 13 and part[0]["prompt_id"] == 8 and part[12]["prompt_id"] == 20
    # memory-mapped: opening it again allocates nothing near the size of the states
    before = pa.total_allocated_bytes()
    again = store.hf_dataset(3)
    assert pa.total_allocated_bytes() - before < written[3].nbytes // 4 and again.cache_files
    items = store.torch_dataset(3)
    assert len(items) == 25
    item = items[21]
    assert item["prompt_id"] == 21 and item["state"].dtype == torch.float32
    assert np.array_equal(item["state"].numpy(), written[3][21])
    assert item["token_ids"].tolist() == store.prompts(["token_ids"]).column(0)[21].as_py()
    batch = next(iter(torch.utils.data.DataLoader(items, batch_size=10, collate_fn=list)))
    assert [b["prompt_id"] for b in batch] == list(range(10))


def test_docs_examples_run_against_a_bf16_every_position_store(tmp_path):
    """Every ```python block of docs/store-format.md, in order, in one namespace."""
    written, every = write_store(tmp_path / "s", dtype="bf16", positions="all")
    doc = (ROOT / "docs" / "store-format.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) >= 4
    namespace = {"STORE": str(tmp_path / "s"), "K": 3}
    for i, block in enumerate(blocks):
        exec(compile(block, f"store-format.md block {i}", "exec"), namespace)
    bf16 = torch.from_numpy(written[3]).to(torch.bfloat16).float().numpy()
    assert np.array_equal(namespace["states"], bf16) and np.array_equal(namespace["ids"], np.arange(25))
    assert np.array_equal(namespace["first_prompt"], torch.from_numpy(every[3][0]).to(torch.bfloat16).float().numpy())
    assert np.array_equal(namespace["some"], bf16[[5, 0, 2]])
    assert namespace["first_ten"].n_rows == 10 and len(namespace["batch"]) == 8
    assert namespace["hf_torch"][0]["state"].dtype == torch.float32
