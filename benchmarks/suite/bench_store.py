"""asv benchmarks of the store (``collide.store``): write and read costs over bare pyarrow, same run.

Synthetic float32 states (n x d per layer, 2 layers, a few massive dimensions) are written shard by
shard with ``StoreWriter.commit_shard`` (Parquet encode, sha256, fsync, rename, manifest) and read
back; n, d, shard rows = 16384, 576, 2048 (full: 65536, 1024, 4096; tiny: 2048, 64, 512). Every
``track_*`` is seconds of ours / seconds of bare pyarrow on the same data (lower is better):

- ``write_time_vs_raw_parquet``: commit_shard / ``pq.write_table`` + fsync of the same tables (no
  checksum, no temporary name, no manifest): the price of the atomic commit;
- ``layer_read_time_vs_raw_parquet``: ``Store.layer(k)`` (ids + one (n, d) float32 matrix) /
  ``pq.read_table`` of the same files (Arrow tables only, no matrix);
- ``iter_blocks_time_vs_raw_parquet``: the same for streaming the layer with ``Store.iter_blocks``.

Reads come from the page cache (the files were just written): they measure decoding, not the disk.
Each is the best of 3. Round trip and checksums are tests (tests/store/test_store.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .common import best_time, pick


def shards(n: int, d: int, shard_rows: int, layers: list[int]) -> list:
    """Deterministic (prompts table, {layer: states}) shards; states with a few massive dimensions."""
    from collide.store import prompt_table

    rng = np.random.default_rng(0)
    out = []
    for first in range(0, n, shard_rows):
        rows = min(shard_rows, n - first)
        tokens = [[256, *rng.integers(0, 256, 8).tolist()] for _ in range(rows)]
        states = {}
        for k in layers:
            x = rng.standard_normal((rows, d), dtype=np.float32) * 40
            x[:, :3] *= 20  # massive activations
            states[k] = x
        out.append((prompt_table(first, tokens, [f"bench:{first + i}" for i in range(rows)]), states))
    return out


def measure() -> dict[str, float]:
    """{ratio name: value} of the ratios in the module docstring (one measurement)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from collide.store import StoreWriter, open_store, state_array

    n, d, shard_rows = pick((2048, 64, 512), (16384, 576, 2048), (65536, 1024, 4096))
    layers, repeats = [0, 1], 3
    data = shards(n, d, shard_rows, layers)
    header = dict(model={"name": "bench"}, dtype="fp32", final_norm="post", layer_convention="bench", layers=layers,
                  d=d, n_layers=1, n_prompts=n, keep_text=False, shard_rows=shard_rows, batch_tokens=1,
                  max_batch_size=1)
    with tempfile.TemporaryDirectory(prefix="collide_bench_store_") as tmp:
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

        t_raw_write, t_write = best_time(write_raw, repeats), best_time(write_store, repeats)
        store = open_store(tmp / f"store{attempt[0]}")
        files = [store.path / f"layer={layers[-1]}" / f"part-{s['index']:05d}.parquet" for s in store.shards]

        def read_raw():
            for f in files:
                pq.read_table(f)

        def read_blocks():
            for _ in store.iter_blocks(layers[-1], 4096):
                pass

        read_raw()  # page cache warm-up
        t_raw_read = best_time(read_raw, repeats)
        t_read = best_time(lambda: store.layer(layers[-1]), repeats)
        t_blocks = best_time(read_blocks, repeats)
    return {"write_time_vs_raw_parquet": t_write / t_raw_write, "layer_read_time_vs_raw_parquet": t_read / t_raw_read,
            "iter_blocks_time_vs_raw_parquet": t_blocks / t_raw_read}


class Store:
    """The ratios of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 600

    def setup_cache(self):
        return measure()

    setup_cache.timeout = 600

    def track_write_time_vs_raw_parquet(self, cache):
        return cache["write_time_vs_raw_parquet"]

    def track_layer_read_time_vs_raw_parquet(self, cache):
        return cache["layer_read_time_vs_raw_parquet"]

    def track_iter_blocks_time_vs_raw_parquet(self, cache):
        return cache["iter_blocks_time_vs_raw_parquet"]
