"""Store write and read benchmarks, as ratios measured in one run (see benchmarks/README.md).

Synthetic float32 states (n x d per layer, LLM-like scale) are written shard by shard with
``StoreWriter.commit_shard`` (Parquet encode, sha256, fsync, rename, manifest) and read back.

- ``write_vs_raw_parquet``: MB/s of commit_shard / MB/s of a bare ``pq.write_table`` + fsync of the
  same tables (no checksum, no temporary name, no manifest): the price of the atomic commit.
- ``layer_read_vs_raw_parquet``: MB/s of ``Store.layer(k)`` (ids + one (n, d) float32 matrix) /
  MB/s of ``pq.read_table`` of the same files (Arrow tables only, no matrix).
- ``iter_blocks_vs_raw_parquet``: the same for streaming the layer with ``Store.iter_blocks``.
Reads come from the page cache (the files were just written): they measure decoding, not the disk.
MB are 1e6 bytes of state data. ``python benchmarks/bench_store.py [--full]`` prints JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collide.store import StoreWriter, open_store, prompt_table, state_array
from collide.verify import verify_store


def shards(n: int, d: int, shard_rows: int, layers: list[int]):
    """Deterministic (prompts table, {layer: states}) shards; states with a few massive dimensions."""
    rng = np.random.default_rng(0)
    for first in range(0, n, shard_rows):
        rows = min(shard_rows, n - first)
        tokens = [[256, *rng.integers(0, 256, 8).tolist()] for _ in range(rows)]
        states = {}
        for k in layers:
            x = rng.standard_normal((rows, d), dtype=np.float32) * 40
            x[:, :3] *= 20  # massive activations
            states[k] = x
        yield prompt_table(first, tokens, [f"bench:{first + i}" for i in range(rows)]), states


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(quick: bool = True) -> dict:
    n, d, shard_rows = (16384, 576, 2048) if quick else (65536, 1024, 4096)
    layers, repeats = [0, 1], 3
    data = list(shards(n, d, shard_rows, layers))
    state_mb = n * d * 4 * len(layers) / 1e6
    header = dict(model={"name": "bench"}, dtype="fp32", final_norm="post", layer_convention="bench", layers=layers,
                  d=d, n_layers=1, n_prompts=n, keep_text=False, shard_rows=shard_rows, batch_tokens=1,
                  max_batch_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        attempt = [0]

        def write_store():
            attempt[0] += 1
            writer = StoreWriter.open(tmp / f"store{attempt[0]}", {"bench": attempt[0]}, header)
            for table, states in data:
                writer.commit_shard(table, states)
            writer.finish()

        def write_raw():
            attempt[0] += 1
            out = tmp / f"raw{attempt[0]}"
            out.mkdir()
            for table, states in data:
                first = table.column("prompt_id")[0].as_py()
                for k in layers:
                    file = out / f"{k}-{first}.parquet"
                    pq.write_table(pa.table({"prompt_id": table.column("prompt_id"), "state": state_array(states[k])}),
                                   file, compression="none", use_dictionary=False)
                    with open(file, "rb+") as f:
                        os.fsync(f.fileno())  # durable, as the store's files are

        t_raw_write = best(write_raw, repeats)
        t_write = best(write_store, repeats)
        store = open_store(tmp / f"store{attempt[0]}")
        files = [store.path / f"layer={layers[-1]}" / f"part-{s['index']:05d}.parquet" for s in store.shards]
        layer_mb = state_mb / len(layers)

        def read_layer():
            store.layer(layers[-1])

        def read_blocks():
            for _ in store.iter_blocks(layers[-1], 4096):
                pass

        def read_raw():
            for f in files:
                pq.read_table(f)

        read_raw()  # page cache warm-up
        t_raw_read, t_read, t_blocks = best(read_raw, repeats), best(read_layer, repeats), best(read_blocks, repeats)
        ids, states = store.layer(layers[-1])
        expected = np.concatenate([s[layers[-1]] for _, s in data])
        round_trip = bool(np.array_equal(ids, np.arange(n)) and np.array_equal(states.view(np.uint32),
                                                                                 expected.view(np.uint32)))
        t0 = time.perf_counter()
        verified = verify_store(store.path) == []
        t_verify = time.perf_counter() - t0
    return {
        "ratios": {
            "write_vs_raw_parquet": {"value": t_raw_write / t_write, "better": "higher", "target": None},
            "layer_read_vs_raw_parquet": {"value": t_raw_read / t_read, "better": "higher", "target": None},
            "iter_blocks_vs_raw_parquet": {"value": t_raw_read / t_blocks, "better": "higher", "target": None},
        },
        "exact": {"round_trip_bit_identical": round_trip, "verify_ok": verified},
        "figures": {
            "write_mb_per_s": state_mb / t_write, "raw_write_mb_per_s": state_mb / t_raw_write,
            "layer_read_mb_per_s": layer_mb / t_read, "iter_blocks_mb_per_s": layer_mb / t_blocks,
            "raw_read_mb_per_s": layer_mb / t_raw_read, "verify_mb_per_s": state_mb / t_verify,
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv), indent=1))
