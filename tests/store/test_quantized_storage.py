"""Quantized storage (store.dtype=int8|int4, collide/store/quantized.py): the definition checked exactly against
Python's integers and fractions, the packed layout, stores that round-trip and verify, the identity, and a
collision the storage makes that the search reports exactly."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collide.config import SearchConfig
from collide.errors import CollideError
from collide.store import StoreWriter, decode_states, encode_states, open_store
from collide.store.quantized import dequantize, quantize, width
from collide.store.verify import verify_store
from test_store import D, header, shard_data

ROOT = Path(__file__).resolve().parents[2]
Q = {"int8": 127, "int4": 7}


def reference(row, dtype: str, peak=None) -> tuple[int, list[int]]:
    """(e, codes) by the definition, in exact rational arithmetic: the smallest e >= -127 with peak * 2^-e <= Q,
    codes = round half to even of x * 2^-e (peak: max|x| of the row, or the tensor's)."""
    values = [Fraction(float(v)) for v in row]
    peak = max(abs(v) for v in values) if peak is None else Fraction(float(peak))
    e = -127
    while peak * Fraction(2) ** -e > Q[dtype]:
        e += 1
    return e, [round(v * Fraction(2) ** -e) for v in values]  # Python's round of a Fraction: half to even


def rows_to_test() -> np.ndarray:
    """Rows that exercise the definition: peaks at and around Q * 2^k, ties at half a step, zeros, a row of
    zeros, subnormal and huge values, and random rows of several magnitudes; d = 7 (odd: int4's last nibble)."""
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(7) * scale for scale in (1e-3, 1.0, 37.0, 3e4)]
    rows += [[127.0, 63.5, -0.5, 1.5, 2.5, -2.5, 0.0], [7.0, 3.5, -3.5, 0.5, -1.5, 6.5, 1.0],
             [np.nextafter(np.float32(127), np.float32(200)), 1, 2, 3, 4, 5, 6], [0.0] * 7,
             [1e-45, -2e-44, 0, 0, 0, 0, 3e-45], [3e38, -1e38, 1.0, 0, 0, 0, 2e37], [-8.0, 0, 0, 0, 0, 0, 0.25]]
    return np.array(rows, np.float32)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_codes_and_values_follow_the_definition_exactly(dtype, granularity):
    x = rows_to_test()
    rows = quantize(x, dtype, granularity)
    assert rows.dtype == np.uint8 and rows.shape == (len(x), width(dtype, 7)) == (len(x), 1 + (7 if dtype == "int8" else 4))
    back = dequantize(rows, dtype, 7)
    assert back.dtype == np.float32
    tensor_peak = np.abs(x).max() if granularity == "tensor" else None
    for i, row in enumerate(x):
        e, codes = reference(row, dtype, tensor_peak)
        if max(abs(c) for c in codes) * Fraction(2) ** e >= 2 ** 128:  # beyond float32: a non-finite row
            assert rows[i, 0] == 255 and np.isnan(back[i]).all()
            continue
        assert rows[i, 0] == e + 127
        assert max(abs(c) for c in codes) <= Q[dtype]
        # the stored value is code * 2^e exactly, and so is its float32
        assert [Fraction(float(v)) for v in back[i]] == [c * Fraction(2) ** e for c in codes]
        assert all(abs(Fraction(float(v)) - Fraction(float(r))) <= Fraction(2) ** e / 2 for v, r in zip(back[i], row))


def test_int4_codes_pack_two_per_byte_low_nibble_first():
    x = np.array([[1, -1, 7, -7, 0, 3, -2]], np.float32)  # peak 7: e = 0, codes = x
    rows = quantize(x, "int4", "row")
    assert rows.tolist() == [[127, 0xF1, 0x97, 0x30, 0x0E]]  # -1 = 0xF, -7 = 0x9, -2 = 0xE; odd d: high nibble 0
    int8 = quantize(x, "int8", "row")  # peak 7 <= 127 * 2^-4: e = -4, codes 16 x
    assert int8[0, 0] == 123 and int8[0, 1:].view(np.int8).tolist() == [16, -16, 112, -112, 0, 48, -32]


def test_rows_with_nan_or_inf_read_back_as_nan_and_do_not_set_the_tensor_scale():
    x = np.array([[1.0, 2.0], [np.inf, 0.0], [np.nan, 1.0], [0.5, -4.0]], np.float32)
    for granularity in ("row", "tensor"):
        rows = quantize(x, "int8", granularity)
        back = dequantize(rows, "int8", 2)
        assert rows[1, 0] == rows[2, 0] == 255 and np.isnan(back[1:3]).all()
        assert np.isfinite(back[[0, 3]]).all()
    assert quantize(x, "int8", "tensor")[0, 0] == reference(x[3], "int8")[0] + 127  # peak 4 of the finite rows


def quantized_header(dtype: str, granularity: str | None = "row", **kw) -> dict:
    return dict(header(dtype=dtype, **kw), quant_granularity=granularity)


def write_quantized(path, dtype: str, granularity: str, sizes=(10, 10, 5), layers=(0, 3), finish=True):
    """A store of every position in storage ``dtype`` (test_store.shard_data's values); returns the float32 values
    written, {layer: (n, d)}, and {layer: [(n_tokens, d) per prompt]}."""
    writer = StoreWriter.open(path, {"seed": 1}, quantized_header(dtype, granularity, layers=layers,
                                                                  n_prompts=sum(sizes), positions="all"))
    written, every, first = {k: [] for k in layers}, {k: [] for k in layers}, 0
    for rows in sizes:
        table, states, positions = shard_data(first, rows, layers, positions=True)
        writer.commit_shard(table, states, {}, positions)
        for k in layers:
            written[k].append(states[k])
            every[k] += np.split(positions[k], np.cumsum(table.column("n_tokens").to_numpy())[:-1])
        first += rows
    if finish:
        writer.finish()
    return {k: np.concatenate(v) for k, v in written.items()}, every


def store_exponents(path: Path, k: int) -> np.ndarray:
    """The scale exponent e of every row of layer k, read from the scale bytes with pyarrow alone."""
    manifest = json.loads((path / "manifest.json").read_text())
    tables = [pq.read_table(path / f"layer={k}" / f"part-{s['index']:05d}.parquet") for s in manifest["shards"]]
    values = np.concatenate([t.column("state").combine_chunks().flatten().to_numpy() for t in tables])
    return values.reshape(manifest["counts"]["n_prompts"], -1)[:, 0].astype(np.int64) - 127


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_store_round_trip_every_reader_and_verify(tmp_path, dtype, granularity):
    written, every = write_quantized(tmp_path / "s", dtype, granularity)
    store = open_store(tmp_path / "s")
    assert (store.dtype, store.quant_granularity, store.manifest["format_version"]) == (dtype, granularity, 3)
    field = pq.read_schema(tmp_path / "s" / "layer=3" / "part-00001.parquet").field("state")
    assert field.type == pa.list_(pa.uint8(), width(dtype, D))
    assert field.metadata == {b"collide.dtype": dtype.encode(), b"collide.quant_granularity": granularity.encode()}
    for k in store.layers:
        ids, x = store.layer(k)
        parts = np.split(written[k], [10, 20])  # row: each state on its own; tensor: one scale per shard file
        expect = np.concatenate([decode_states(encode_states(p, dtype, granularity), dtype, d=D) for p in parts])
        assert x.dtype == np.float32 and np.array_equal(x, expect)
        assert (np.abs(x - written[k]) <= np.ldexp(1.0, store_exponents(tmp_path / "s", k))[:, None] / 2).all()
        assert np.array_equal(np.concatenate([b for _, b in store.iter_blocks(k, 7)]), x)
        assert np.array_equal(store.states(k, [24, 0, 13]), x[[24, 0, 13]])
        for pid, got in store.position_states(k, [0, 24]):
            if granularity == "row":  # the last position's row is the last-token row, bitwise
                assert np.array_equal(got[-1], x[pid])
            peak = np.abs(every[k][pid] if granularity == "row" else np.concatenate(every[k])).max()
            assert np.abs(got - every[k][pid]).max() <= peak / Q[dtype]
    assert verify_store(tmp_path / "s") == []


def test_a_store_keeps_its_granularity_and_the_identity_names_it(tmp_path, compose):
    from collide.store.identity import identity_hash, store_identity

    write_quantized(tmp_path / "s", "int8", "row", sizes=(10,), finish=False)
    with pytest.raises(CollideError, match="made with quant_granularity='row', this run has 'tensor'"):
        StoreWriter.open(tmp_path / "s", {"seed": 1}, quantized_header("int8", "tensor", n_prompts=10,
                                                                       positions="all"))
    with pytest.raises(CollideError, match="quant_granularity='block'"):
        StoreWriter.open(tmp_path / "t", {}, quantized_header("int4", "block"))
    base = store_identity(compose(["model=tiny-random"]))
    assert "quant_granularity" not in base  # lossless stores keep the identity they had before int8 / int4
    hashes = {identity_hash(base)}
    for dtype in ("int8", "int4"):
        for granularity in ("row", "tensor"):
            identity = store_identity(compose(["model=tiny-random", f"store.dtype={dtype}",
                                               f"store.quant_granularity={granularity}"]))
            assert (identity["dtype"], identity["quant_granularity"]) == (dtype, granularity)
            hashes.add(identity_hash(identity))
    assert len(hashes) == 5
    assert store_identity(compose(["model=tiny-random", "store.quant_granularity=tensor"])) == base  # lossless


def test_a_collision_made_by_the_storage_is_found_exactly(tmp_path):
    """Two distinct states with the same int4 codes are one stored state: the search reports the pair at distance
    0, certified. A state one code away from them is exactly one step (2^0) away."""
    from collide.search import search_store
    from collide.store import prompt_table

    states = np.array([[7, 1.2, -2.3, 0.4, 3.1, -5.8, 0.0, 2.2],   # peak 7: e = 0, codes = round(x)
                       [7, 1.3, -2.2, 0.3, 3.0, -5.9, 0.1, 2.1],   # other values, the same codes
                       [7, 2.0, -2.0, 0.0, 3.0, -6.0, 0.0, 2.0],   # the codes of row 0, one of them +1
                       [7, 5, 5, 5, 5, 5, 5, 5], [7, -5, -5, -5, -5, -5, -5, -5]], np.float32)
    writer = StoreWriter.open(tmp_path / "s", {}, quantized_header("int4", layers=(1,), n_prompts=len(states)))
    writer.commit_shard(prompt_table(0, [[i] for i in range(len(states))], ["t"] * len(states)), {1: states})
    store = writer.finish()
    assert np.array_equal(store.layer(1)[1][0], [7, 1, -2, 0, 3, -6, 0, 2])
    result = search_store(store, 1, 1e-6, SearchConfig(progress=False)).result
    assert result.certified and result.distance == 0.0 and tuple(result.pair) == (0, 1)
    assert result.n_collisions == 1 and result.nn_distance[2] == 1.0


def test_docs_reading_examples_decode_quantized_stores(tmp_path):
    """The pyarrow-alone recipe of docs/store-format.md reads an int4 store exactly as collide does."""
    write_quantized(tmp_path / "s", "int4", "tensor")
    doc = (ROOT / "docs" / "store-format.md").read_text()
    block = re.findall(r"```python\n(.*?)```", doc, re.S)[0]
    namespace = {"STORE": str(tmp_path / "s"), "K": 3}
    exec(compile(block, "store-format.md block 0", "exec"), namespace)
    assert np.array_equal(namespace["states"], open_store(tmp_path / "s").layer(3)[1])


def test_a_run_with_store_dtype_int4_stores_the_codes_of_its_states_and_verifies(tmp_path, compose):
    """collide run store.dtype=int4: each shard's states are those of the lossless run, encoded; the report says a
    collision may come from the storage."""
    from collide.pipeline import run_pipeline

    common = ["model=tiny-random", f"store.root={tmp_path / 'stores'}", "extract.progress=false",
              "search.progress=false", "report.figures=false", "n_prompts=30", "layers=[0,2,4]", "store.shard_rows=8"]
    exact = run_pipeline(compose([*common, "store.dtype=fp32"]), tmp_path / "fp32", "test")
    coded = run_pipeline(compose([*common, "store.dtype=int4", "store.quant_granularity=tensor"]), tmp_path / "int4",
                         "test")
    stores = {name: open_store(json.loads((tmp_path / name / "store.json").read_text())["path"])
              for name in ("fp32", "int4")}
    assert (stores["int4"].dtype, stores["int4"].quant_granularity) == ("int4", "tensor")
    for k in (0, 2, 4):
        x = stores["fp32"].layer(k)[1]
        expect = np.concatenate([decode_states(encode_states(x[i:i + 8], "int4", "tensor"), "int4", d=x.shape[1])
                                 for i in range(0, len(x), 8)])
        assert np.array_equal(stores["int4"].layer(k)[1], expect)
    assert verify_store(stores["int4"].path) == []
    assert exact["quantization"]["collisions_are"] == "model"
    assert coded["quantization"]["storage"] == {"dtype": "int4", "lossless": False}
    assert coded["quantization"]["collisions_are"] == "model_or_storage"


@pytest.mark.parametrize("dtype, granularity, damage, fragment", [
    ("int8", "row", lambda r: r.__setitem__((0, 3), 0x80), "a code outside -127..127"),
    ("int4", "row", lambda r: r.__setitem__((0, 2), 0x08), "a code outside -7..7"),
    ("int4", "row", lambda r: r.__setitem__((1, slice(None)), [255, 0x10, 0, 0, 0]), "a NaN row (scale byte 255)"),
    ("int4", "row", lambda r: r.__setitem__((1, -1), r[1, -1] | 0x70), "padding nibble is not 0"),
    ("int8", "tensor", lambda r: r.__setitem__((1, 0), r[0, 0] + 1), "different scales"),
])
def test_verify_reads_the_codes_of_a_quantized_store(tmp_path, dtype, granularity, damage, fragment):
    """Rows handed to the writer already encoded are stored as given (and hashed): collide verify finds codes that
    no encoding produces."""
    from collide.store import prompt_table

    x = np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32)
    rows = quantize(x, dtype, granularity)
    writer = StoreWriter.open(tmp_path / "ok", {}, dict(quantized_header(dtype, granularity, layers=(1,), n_prompts=4), d=7))
    writer.commit_shard(prompt_table(0, [[i] for i in range(4)], ["t"] * 4), {1: rows.copy()})
    writer.finish()
    assert verify_store(tmp_path / "ok") == []
    damage(rows)
    writer = StoreWriter.open(tmp_path / "bad", {}, dict(quantized_header(dtype, granularity, layers=(1,), n_prompts=4), d=7))
    writer.commit_shard(prompt_table(0, [[i] for i in range(4)], ["t"] * 4), {1: rows})
    writer.finish()
    problems = verify_store(tmp_path / "bad")
    assert len(problems) == 1 and fragment in problems[0] and "layer=1/part-00000.parquet" in problems[0]


def test_a_tensor_scaled_store_serves_fewer_prompts_only_as_whole_shards(tmp_path, compose):
    """The first N prompts of a larger store are this run's values only where no shard (one tensor scale) is cut."""
    from collide.pipeline import run_pipeline

    common = ["model=tiny-random", f"store.root={tmp_path / 'stores'}", "extract.progress=false",
              "search.progress=false", "report.figures=false", "report.diagnostics=false", "layers=[2]",
              "store.shard_rows=8", "store.dtype=int4", "store.quant_granularity=tensor"]
    run_pipeline(compose([*common, "n_prompts=30"]), tmp_path / "n30", "test")
    for n, served in ((16, "subset"), (20, "exact")):  # 20 cuts the third shard: extracted on its own
        run_pipeline(compose([*common, f"n_prompts={n}"]), tmp_path / f"n{n}", "test")
        record = json.loads((tmp_path / f"n{n}" / "store.json").read_text())
        assert record["served"] == served
    full, cut = (open_store(json.loads((tmp_path / name / "store.json").read_text())["path"]) for name in ("n30", "n20"))
    assert np.array_equal(full.layer(2)[1][:16], cut.layer(2)[1][:16])
